//! HTTP plumbing shared by the store server and the proxy: binding, the accept loop, the response
//! body type and `Range` parsing.
//!
//! Invariants: at most [`ConnLimits::max`] connections are open per server and
//! [`ConnLimits::per_addr`] per client address; a newcomer past a cap takes the place of the
//! oldest idle connection, so idle connections never lock out honest clients; accept errors back
//! off instead of ending the loop; shutdown stops accepting at once and gives open connections
//! [`DRAIN_TIMEOUT`] to finish. Streamed bodies are fed through [`Pace`], which cuts off a client
//! that stalls or reads too slowly.
//!
//! Files: `serve` (binding, the accept loop, the drain), `admission` (who holds the connections),
//! `body` (the body type and the response pieces), `client` (one `GET` on a connection of its
//! own, for the proxy's NAR requests to peers), `pace`, `raw` (requests a handler serves
//! itself on the socket before hyper gets the connection), `tasks` (the tasks feeding streamed
//! bodies), `resources`. None imports this file:
//! it only re-exports.

mod admission;
mod body;
pub mod client;
mod pace;
pub mod raw;
mod resources;
mod serve;
mod tasks;
pub use admission::{addr_key, Admission, ConnLimits, HEADER_READ_TIMEOUT, MAX_CONNECTIONS};
pub use body::{
    is_head, method_not_allowed, nar_response, not_found, ok, parse_range, range_not_satisfiable, strip_for_head, text,
    Body, ByteRange, Unsatisfiable,
};
pub use pace::{Pace, PaceError, PACE_WINDOW, PACE_WINDOW_BYTES};
pub use resources::{nofile_limit, raise_nofile_limit, release_after_bursts, release_free_memory};
pub use serve::{bind, serve, serve_with, Handler, DRAIN_TIMEOUT, MAX_READ_BUF};
pub use tasks::BodyTasks;
