//! The build graph: steps as a DAG (petgraph), checked for unknown `needs`
//! and cycles, with one fixed order.
//!
//! The order is a topological order that, among steps ready at the same time,
//! takes the one listed first in the recipe. It is the layer stacking order:
//! a step's lower layers are its transitive dependencies in this order, and
//! the image merges all layers in it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::{Dfs, Reversed};
use petgraph::Direction;

use crate::fields::suggest;
use crate::recipe::{Recipe, RecipeError};

/// A checked DAG over a recipe's steps (node `i` is `recipe.steps[i]`).
#[derive(Debug, Clone)]
pub struct Graph {
    dag: DiGraph<usize, ()>,
    order: Vec<usize>,
    position: Vec<usize>,
}

impl Graph {
    /// Builds and checks the graph of `recipe`.
    pub fn new(recipe: &Recipe) -> Result<Graph, RecipeError> {
        let n = recipe.steps.len();
        let mut dag = DiGraph::with_capacity(n, n);
        for i in 0..n {
            dag.add_node(i);
        }
        for (i, step) in recipe.steps.iter().enumerate() {
            if step.kind.is_base() && !step.needs.is_empty() {
                return Err(recipe.error_at_step(
                    i,
                    format!(
                        "step `{}` ({}) builds a root from nothing and cannot have `needs`; remove them",
                        step.id,
                        step.kind.name()
                    ),
                ));
            }
            if step.kind.runs_in_root() && step.needs.is_empty() {
                return Err(recipe.error_at_step(
                    i,
                    format!(
                        "step `{}` ({}) runs programs inside the root but has no `needs`; add `needs: [<base step>]`",
                        step.id,
                        step.kind.name()
                    ),
                ));
            }
            for need in &step.needs {
                let Some(j) = recipe.index_of(need) else {
                    let hint = suggest(need, recipe.steps.iter().map(|s| s.id.as_str()))
                        .map(|s| format!("did you mean `{s}`?"))
                        .unwrap_or_else(|| "add that step or fix the name".into());
                    return Err(recipe.error_at_step(
                        i,
                        format!(
                            "step `{}` needs `{need}`, which is not a step in this recipe; {hint}",
                            step.id
                        ),
                    ));
                };
                dag.update_edge(NodeIndex::new(j), NodeIndex::new(i), ());
            }
        }
        if let Some(cycle) = find_cycle(&dag) {
            let names: Vec<&str> = cycle.iter().map(|&i| recipe.steps[i].id.as_str()).collect();
            return Err(recipe.error_at_step(
                cycle[0],
                format!(
                    "steps need each other in a cycle: {} -> {}; remove one of these `needs`",
                    names.join(" -> "),
                    names[0]
                ),
            ));
        }
        let order = stable_topological_order(&dag);
        let mut position = vec![0; n];
        for (p, &i) in order.iter().enumerate() {
            position[i] = p;
        }
        Ok(Graph {
            dag,
            order,
            position,
        })
    }

    /// All steps, dependencies before dependents, ties in recipe order.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// The direct dependencies of step `i`, in graph order.
    pub fn needs(&self, i: usize) -> Vec<usize> {
        let mut deps: Vec<usize> = self
            .dag
            .neighbors_directed(NodeIndex::new(i), Direction::Incoming)
            .map(|n| n.index())
            .collect();
        deps.sort_by_key(|&d| self.position[d]);
        deps
    }

    /// Every step `i` builds on (transitively), in graph order: its lower layers.
    pub fn ancestors(&self, i: usize) -> Vec<usize> {
        let reversed = Reversed(&self.dag);
        let mut dfs = Dfs::new(reversed, NodeIndex::new(i));
        let mut found = Vec::new();
        while let Some(n) = dfs.next(reversed) {
            if n.index() != i {
                found.push(n.index());
            }
        }
        found.sort_by_key(|&d| self.position[d]);
        found
    }

    /// For each step, the weight of the heaviest chain of steps from it to
    /// the end of the graph, its own `weight` included. The scheduler starts
    /// the ready step with the heaviest chain first, so the longest chain of
    /// a build is not kept waiting by steps off it.
    pub fn chain_weights(&self, weight: impl Fn(usize) -> u64) -> Vec<u64> {
        let mut chain = vec![0u64; self.order.len()];
        for &i in self.order.iter().rev() {
            let heaviest_after = self
                .dag
                .neighbors_directed(NodeIndex::new(i), Direction::Outgoing)
                .map(|n| chain[n.index()])
                .max()
                .unwrap_or(0);
            chain[i] = weight(i) + heaviest_after;
        }
        chain
    }

    /// Whether `a` comes before `b` through `needs` (directly or not).
    pub fn is_ancestor(&self, a: usize, b: usize) -> bool {
        petgraph::algo::has_path_connecting(&self.dag, NodeIndex::new(a), NodeIndex::new(b), None)
    }

    /// The graph in Graphviz dot.
    pub fn to_dot(&self, recipe: &Recipe) -> String {
        let mut out = format!("digraph {:?} {{\n  rankdir=LR;\n", recipe.name);
        for &i in &self.order {
            let s = &recipe.steps[i];
            out.push_str(&format!(
                "  {:?} [label=\"{}\\n({})\"];\n",
                s.id,
                s.id,
                s.kind.name()
            ));
        }
        for &i in &self.order {
            for d in self.needs(i) {
                out.push_str(&format!(
                    "  {:?} -> {:?};\n",
                    recipe.steps[d].id, recipe.steps[i].id
                ));
            }
        }
        out.push_str("}\n");
        out
    }
}

/// Kahn's algorithm, always taking the ready node listed first in the recipe.
fn stable_topological_order(dag: &DiGraph<usize, ()>) -> Vec<usize> {
    let mut indegree: Vec<usize> = dag
        .node_indices()
        .map(|n| dag.neighbors_directed(n, Direction::Incoming).count())
        .collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..indegree.len())
        .filter(|&i| indegree[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(indegree.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for n in dag.neighbors_directed(NodeIndex::new(i), Direction::Outgoing) {
            indegree[n.index()] -= 1;
            if indegree[n.index()] == 0 {
                ready.push(Reverse(n.index()));
            }
        }
    }
    order
}

/// One cycle, as steps in `needs` order, starting at its first-listed step.
fn find_cycle(dag: &DiGraph<usize, ()>) -> Option<Vec<usize>> {
    let scc = tarjan_scc(dag)
        .into_iter()
        .filter(|c| c.len() > 1 || dag.contains_edge(c[0], c[0]))
        .min_by_key(|c| c.iter().map(|n| n.index()).min())?;
    let start = *scc.iter().min()?;
    // Walk from `start` inside the component until we are back.
    let mut path = vec![start];
    let mut seen = vec![start];
    let mut current = start;
    loop {
        let mut next_nodes: Vec<NodeIndex> = dag
            .neighbors_directed(current, Direction::Outgoing)
            .filter(|n| scc.contains(n))
            .collect();
        next_nodes.sort();
        if next_nodes.contains(&start) {
            break;
        }
        let next = *next_nodes
            .iter()
            .find(|n| !seen.contains(n))
            .unwrap_or(&next_nodes[0]);
        if seen.contains(&next) {
            break;
        }
        seen.push(next);
        path.push(next);
        current = next;
    }
    Some(path.into_iter().map(|n| n.index()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::recipe::parse;
    use std::path::Path;

    fn graph(text: &str) -> Result<(Recipe, Graph), RecipeError> {
        let r = parse(text, Path::new("r.yaml"))?;
        let g = Graph::new(&r)?;
        Ok((r, g))
    }

    const DIAMOND: &str = "\
name: t
steps:
  stamp:
    needs: [tools, motd]
    run: x
  base:
    debootstrap: {suite: trixie}
  tools:
    needs: [base]
    apt: {packages: [less]}
  motd:
    needs: [base]
    file: {path: /etc/motd, content: hi}
";

    #[test]
    fn order_is_topological_with_recipe_tie_break() {
        let (r, g) = graph(DIAMOND).unwrap();
        let ids: Vec<&str> = g.order().iter().map(|&i| r.steps[i].id.as_str()).collect();
        assert_eq!(ids, ["base", "tools", "motd", "stamp"]);
        let anc: Vec<&str> = g
            .ancestors(0)
            .iter()
            .map(|&i| r.steps[i].id.as_str())
            .collect();
        assert_eq!(anc, ["base", "tools", "motd"]);
        assert!(g.is_ancestor(1, 0));
        assert!(!g.is_ancestor(2, 3) && !g.is_ancestor(3, 2));
        assert!(g.to_dot(&r).contains("\"tools\" -> \"stamp\";"));
    }

    #[test]
    fn chain_weights_follow_the_heaviest_chain() {
        let (_, g) = graph(
            "\
name: t
steps:
  base:
    debootstrap: {suite: trixie}
  small:
    needs: [base]
    run: x
  kernel:
    needs: [base]
    run: x
  packages:
    needs: [kernel]
    run: x
  last:
    needs: [small, packages]
    run: x
",
        )
        .unwrap();
        // base 1, small 2, kernel 10, packages 10, last 1
        let weights = [1, 2, 10, 10, 1];
        let chain = g.chain_weights(|i| weights[i]);
        assert_eq!(chain, vec![22, 3, 21, 11, 1]);
    }

    #[test]
    fn cycles_are_named() {
        let text = "name: t\nsteps:\n  base:\n    debootstrap: {suite: trixie}\n  a:\n    needs: [base, c]\n    run: x\n  b:\n    needs: [a]\n    run: x\n  c:\n    needs: [b]\n    run: x\n";
        let e = graph(text).unwrap_err();
        assert!(e.to_string().contains("a -> b -> c -> a"), "{e}");
        assert_eq!(e.line, 5);
    }

    #[test]
    fn unknown_needs_and_misplaced_needs() {
        let e = graph("name: t\nsteps:\n  base:\n    debootstrap: {suite: trixie}\n  a:\n    needs: [bsae]\n    run: x\n").unwrap_err();
        assert!(e.to_string().contains("did you mean `base`?"), "{e}");
        assert_eq!(e.line, 5);
        let e = graph("name: t\nsteps:\n  a:\n    run: x\n").unwrap_err();
        assert!(e.to_string().contains("no `needs`"), "{e}");
        let e = graph("name: t\nsteps:\n  a:\n    run: x\n    needs: [a]\n").unwrap_err();
        assert!(e.to_string().contains("a -> a"), "{e}");
    }
}
