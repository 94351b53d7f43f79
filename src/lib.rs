//! local-nix-cache: share Nix store paths between the hosts of one LAN, safely.
//!
//! See `docs/ARCHITECTURE.md` for the map of the code.

pub mod beacon;
pub mod cache_url;
pub mod cli;
pub mod config;
pub mod dns;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod narinfo;
pub mod node;
pub mod peers;
pub mod proxy;
pub mod server;
pub mod settings;
pub mod status;
pub mod store;
pub mod summary;

#[cfg(test)]
mod architecture_tests;
