//! kiln builds microVM root filesystems from declarative YAML recipes:
//! steps form a content-hashed DAG, each step's output is a cached layer, and
//! the layers merge into a reproducible ext4 image.
//!
//! Data flow: [`recipe`] (parse, validate) → [`graph`] (DAG, order) →
//! [`key`] (step keys) → [`resolve`] (each step's key and cached layer; the
//! one walk that [`plan`], [`build`] and [`cache`] share) → [`build`] (run
//! or reuse each step in a [`sandbox`], [`capture`] its [`layer`] into the
//! [`store`]) → [`assemble`] (merge) → [`ext4`] (image).

pub mod apt_lists;
pub mod artifacts;
pub mod assemble;
pub mod blob_stream;
pub mod boot;
pub mod boot_checks;
pub mod build;
pub mod cache;
pub mod capture;
pub mod checks;
pub mod cli;
pub mod config;
pub mod debs;
pub mod delta;
pub mod diff;
pub mod digest;
pub mod dpkg;
pub mod explain;
pub mod ext4;
pub mod fields;
pub mod fsck;
pub mod graph;
pub mod host;
pub mod image;
pub mod io_at;
pub mod kernel;
pub mod key;
pub mod layer;
pub mod lock;
pub mod measure;
pub mod normalize;
pub mod outputs;
pub mod plan;
pub mod progress;
pub mod recipe;
pub mod remote;
pub mod resolve;
pub mod sandbox;
pub mod sbom;
pub mod sign;
pub mod step;
pub mod store;
pub mod timings;
pub mod tree_check;
pub mod verify;
pub mod yaml_limits;
