//! local-nix-cache: share Nix store paths between the hosts of one LAN, safely.
//!
//! See `docs/ARCHITECTURE.md` for the map of the code.

pub mod beacon;
pub mod cli;
pub mod config;
pub mod dns;
pub mod http;
pub mod narinfo;
pub mod peers;
pub mod proxy;
pub mod server;
pub mod status;
pub mod store;
