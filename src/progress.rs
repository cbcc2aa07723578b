//! What a build prints as it goes, on stderr. Every event is a plain line,
//! the same on a terminal and in a log. On a terminal, a status line below
//! them also shows the steps running now with their elapsed time and how
//! much each has downloaded (`running: packages 12s (41.5 MiB downloaded)`), redrawn
//! twice a second, and is cleared when the steps are done; when stderr is
//! not a terminal nothing but the plain lines is written.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The build's printer; cheap to share between the step threads.
pub struct Progress {
    /// Whether to print at all.
    enabled: bool,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    ticker: Option<std::thread::JoinHandle<()>>,
}

#[derive(Default)]
struct State {
    /// Steps running now, with when they started.
    running: BTreeMap<String, Instant>,
    /// Where steps download to, with the bytes those folders held before.
    downloads: BTreeMap<String, (Vec<PathBuf>, u64)>,
    /// Whether a status line is on screen (to clear before the next line).
    drawn: bool,
}

impl Progress {
    /// A printer; `enabled: false` prints nothing. The status line is drawn
    /// only when stderr is a terminal.
    pub fn start(enabled: bool) -> Progress {
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let live = enabled && std::io::stderr().is_terminal();
        let ticker = live.then(|| {
            let (state, stop) = (Arc::clone(&state), Arc::clone(&stop));
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    std::thread::sleep(Duration::from_millis(500));
                    let mut state = state.lock().unwrap_or_else(|e| e.into_inner());
                    draw(&mut state);
                }
            })
        });
        Progress {
            enabled,
            state,
            stop,
            ticker,
        }
    }

    /// Prints one plain line (above the status line, if one is shown).
    pub fn line(&self, text: &str) {
        if !self.enabled {
            return;
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut err = std::io::stderr().lock();
        if state.drawn {
            let _ = write!(err, "\r\x1b[2K");
            state.drawn = false;
        }
        let _ = writeln!(err, "{text}");
        drop(err);
        if self.ticker.is_some() {
            draw(&mut state);
        }
    }

    /// Notes that step `id` is running from now.
    pub fn running(&self, id: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.running.insert(id.to_string(), Instant::now());
    }

    /// Notes that step `id` downloads into `dirs` (its package archive,
    /// its download folder): the status line shows how much they grew.
    pub fn downloading(&self, id: &str, dirs: Vec<PathBuf>) {
        if self.ticker.is_none() {
            return;
        }
        let before = bytes_under(&dirs);
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.downloads.insert(id.to_string(), (dirs, before));
    }

    /// Notes that step `id` is no longer running.
    pub fn done(&self, id: &str) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        state.running.remove(id);
        state.downloads.remove(id);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(ticker) = self.ticker.take() {
            let _ = ticker.join();
        }
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.drawn {
            let _ = write!(std::io::stderr(), "\r\x1b[2K");
            state.drawn = false;
        }
    }
}

/// Redraws the status line: the running steps and how long each has run,
/// cut to the terminal's width.
fn draw(state: &mut State) {
    let mut err = std::io::stderr().lock();
    if state.running.is_empty() {
        if state.drawn {
            let _ = write!(err, "\r\x1b[2K");
            state.drawn = false;
        }
        return;
    }
    let steps: Vec<String> = state
        .running
        .iter()
        .map(|(id, since)| {
            let got = state.downloads.get(id).map_or(0, |(dirs, before)| {
                bytes_under(dirs).saturating_sub(*before)
            });
            step_text(id, since.elapsed(), got)
        })
        .collect();
    let text = status_text(&steps, terminal_width());
    let _ = write!(err, "\r\x1b[2K{text}");
    let _ = err.flush();
    state.drawn = true;
}

/// `packages 12s (41.5 MiB downloaded)`: a running step, its time, what it
/// downloaded.
fn step_text(id: &str, elapsed: Duration, downloaded: u64) -> String {
    let secs = elapsed.as_secs();
    match downloaded {
        0 => format!("{id} {secs}s"),
        b => format!(
            "{id} {secs}s ({:.1} MiB downloaded)",
            b as f64 / (1 << 20) as f64
        ),
    }
}

/// The bytes of the files under `dirs` (missing folders hold none).
fn bytes_under(dirs: &[PathBuf]) -> u64 {
    dirs.iter()
        .flat_map(|dir| walkdir::WalkDir::new(dir).into_iter().flatten())
        .filter(|e| e.file_type().is_file())
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum()
}

/// `running: a 3s, b 1s`, cut to `width` characters.
fn status_text(steps: &[String], width: usize) -> String {
    let text = format!("running: {}", steps.join(", "));
    match text.char_indices().nth(width.saturating_sub(1)) {
        Some((cut, _)) => format!("{}…", &text[..cut.saturating_sub(2)]),
        None => text,
    }
}

/// The terminal's width in columns (80 when it cannot be asked).
fn terminal_width() -> usize {
    terminal_size::terminal_size_of(std::io::stderr())
        .map(|(terminal_size::Width(w), _)| w as usize)
        .filter(|&w| w > 0)
        .unwrap_or(80)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_line_fits_the_terminal() {
        let steps = vec!["packages 12s".to_string(), "node 3s".to_string()];
        assert_eq!(status_text(&steps, 80), "running: packages 12s, node 3s");
        let cut = status_text(&steps, 20);
        assert!(cut.chars().count() <= 20, "{cut}");
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn a_step_shows_what_it_downloaded() {
        let tmp = tempfile::tempdir().unwrap();
        let (archives, partial) = (tmp.path().join("debs"), tmp.path().join("debs/partial"));
        std::fs::create_dir_all(&partial).unwrap();
        std::fs::write(archives.join("cached.deb"), vec![0; 1 << 20]).unwrap();
        let dirs = vec![archives.clone(), tmp.path().join("download")];
        let before = bytes_under(&dirs);
        assert_eq!(before, 1 << 20);
        std::fs::write(partial.join("new.deb"), vec![0; 3 << 19]).unwrap();
        let got = bytes_under(&dirs) - before;
        assert_eq!(
            step_text("packages", Duration::from_secs(12), got),
            "packages 12s (1.5 MiB downloaded)"
        );
        assert_eq!(step_text("hosts", Duration::from_secs(1), 0), "hosts 1s");
    }
}
