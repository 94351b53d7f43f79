//! Admission: the caps on the table ([`MAX_PEERS`], [`MAX_PEERS_PER_ADDR`] per source address)
//! and who makes room when a new node id arrives at a cap.
//!
//! Under pressure, useful peers stay: a peer is *useful* once its store server answered this
//! host's proxy naming its node id at a listed address, or proved the id there. When the table
//! is full, a new node id takes the place of the entry held longest of those that never
//! answered, established or not (announces cost nothing to forge, from any number of spoofed
//! addresses; an answer over HTTP does). A flood of identities, one-off or kept refreshed,
//! therefore never pushes out the hall's real hosts, and a late-comer gets in and stays until
//! its server answered, unless the attacker re-enters identities faster than the table's
//! unanswered entries per time a newcomer needs to answer (about 1,500 a second).

use std::collections::HashMap;
use std::net::IpAddr;

use super::outcome::IgnoreReason;
use super::peer::Peer;
use crate::beacon::wire::NodeId;

/// Most peers in the table (a hall of hundreds of hosts, with room to spare).
pub const MAX_PEERS: usize = 2048;
/// Most node ids announced from one source address: a host restarting gets a new id while its
/// old one has not expired yet, and a test bed may run a few `serve` on one address.
pub const MAX_PEERS_PER_ADDR: usize = 4;

/// Makes room in `peers` for a new node id from `ip` (`answers_tracked`: this table's node
/// reports answers, see `PeerTable::answered`), counting the entries it pushes out in
/// `displaced`: refused when its address already holds its share (every entry listing the
/// address counts, not only those first heard there), or the table is full of peers whose
/// store servers answered this host.
///
/// At its share, the address makes room from its own entries whose store server never
/// answered and never proved the id there (longest held first; an entry that lists other
/// addresses too only loses this one): four ids announced from a host's address by someone
/// else, before the host's new per-run id, do not lock the host out.
pub(super) fn admit(
    peers: &mut HashMap<NodeId, Peer>,
    ip: IpAddr,
    answers_tracked: bool,
    displaced: &mut u64,
) -> Result<(), IgnoreReason> {
    let room = room_at_addr(peers, ip, None)?;
    make_room_at_addr(peers, ip, room, displaced);
    if peers.len() < MAX_PEERS {
        return Ok(());
    }
    // Full: the entry held longest of those whose store server never answered this host
    // makes room, established or not. Announcing is free and any number of source addresses
    // can be spoofed on a link, so announces prove nothing; an answer over HTTP naming the
    // node id at a listed address does (`answered`). Oldest first: a persistent flood is
    // pushed out by newcomers one at a time, and a newcomer is the last of the unanswered to
    // go, with time to answer.
    // A proof over `GET /identity` names the id at an address as an answer does. In a
    // table without answers reported (the `peers` tool), nobody ever answered: there only
    // entries on probation (not established) make room, so a flood cannot push out the
    // established hall first.
    let victim = peers
        .values()
        .filter(|p| p.answered.is_none() && p.proven.is_empty() && (answers_tracked || !p.established()))
        .min_by_key(|p| (p.first_seen, p.node))
        .map(|p| p.node);
    match victim {
        Some(v) => {
            peers.remove(&v);
            *displaced += 1;
            Ok(())
        }
        None => Err(IgnoreReason::TableFull),
    }
}

/// Room at `ip` for one more entry listing it (a new node id, or `gaining`, an entry in the
/// table that is to list `ip` as well): `Ok(None)` when the address is under its share,
/// `Ok(Some(v))` when entry `v` (the longest held at `ip` whose store server never answered and
/// never proved its id there) must give the address up first, refused when every entry there
/// answered. Changes nothing, so a caller can still drop the announce.
pub(super) fn room_at_addr(
    peers: &HashMap<NodeId, Peer>,
    ip: IpAddr,
    gaining: Option<&NodeId>,
) -> Result<Option<NodeId>, IgnoreReason> {
    let at_addr = || {
        peers
            .values()
            .filter(move |p| Some(&p.node) != gaining && p.addrs.iter().any(|a| a.ip() == ip))
    };
    if at_addr().count() < MAX_PEERS_PER_ADDR {
        return Ok(None);
    }
    at_addr()
        .filter(|p| p.answered.is_none() && !p.proven.iter().any(|a| a.ip() == ip))
        .min_by_key(|p| (p.first_seen, p.node))
        .map(|p| Some(p.node))
        .ok_or(IgnoreReason::AddressFull)
}

/// Makes the room [`room_at_addr`] found: `victim` gives up `ip` (and goes, when that was its
/// last address), counted in `displaced`.
pub(super) fn make_room_at_addr(
    peers: &mut HashMap<NodeId, Peer>,
    ip: IpAddr,
    victim: Option<NodeId>,
    displaced: &mut u64,
) {
    let Some(v) = victim else { return };
    if let Some(p) = peers.get_mut(&v) {
        p.addrs.retain(|a| a.ip() != ip);
        if p.addrs.is_empty() {
            peers.remove(&v);
        }
    }
    *displaced += 1;
}
