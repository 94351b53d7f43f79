//! The integration tests, one crate: each file a module, the harness (`common`) compiled once.
//! Run one module with `cargo test --test it beacon::`.

#[macro_use]
mod common;

mod beacon;
mod compression;
mod crowd;
mod crowd_mechanism;
mod hall;
mod hall_serve;
mod hall_sim;
mod hostile_proxy;
mod hostile_store;
mod install;
mod lan;
mod packaging;
mod proxy;
mod proxy_nix;
mod roaming;
mod static_binary;
mod status_page;
mod store_raw;
mod store_server;
mod venues;
