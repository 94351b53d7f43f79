//! Simulated LANs in network namespaces: one bridge namespace, host namespaces wired to it by veth
//! pairs, IPv4 10.x addresses and IPv6 link-local ones. Everything a test sends stays inside the
//! namespaces it created; they are deleted on drop, even when the test fails.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::wait::wait_for;
use local_nix_cache::beacon::{self, wire::NodeId, BeaconConfig, PeerTable};
use tokio_util::sync::CancellationToken;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

static LAN_COUNTER: AtomicU32 = AtomicU32::new(0);

/// One host of a LAN: its namespace, interface and IPv4 address.
#[derive(Clone, Debug)]
pub struct NetHost {
    pub ns: String,
    pub iface: String,
    pub ip4: Ipv4Addr,
}

impl NetHost {
    /// `ip netns exec NS PROGRAM`, for running a real binary as this host.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, program]);
        c
    }
}

pub struct Lan {
    bridge_ns: String,
    pub hosts: Vec<NetHost>,
    /// The third byte of this LAN's subnet, 10.77.<subnet>.0/24.
    pub subnet: u8,
}

/// Host `i` (from 1) of LAN `id` with `n` hosts: 10.77.<id>.<i>/24, or for a hall of more than
/// 254 hosts (the beacon's 1,000-host simulation) 10.<200 + id % 50>.<i / 250>.<i % 250 + 1>/16.
fn host_ip4(id: u32, i: usize, n: usize) -> (Ipv4Addr, u8) {
    if n <= 254 {
        (Ipv4Addr::new(10, 77, (id % 250) as u8, i as u8), 24)
    } else {
        let (hi, lo) = ((i / 250) as u8, (i % 250 + 1) as u8);
        (Ipv4Addr::new(10, 200 + (id % 50) as u8, hi, lo), 16)
    }
}

impl Lan {
    /// A LAN of `n` hosts on one bridge (IGMP snooping off, so multicast floods like a switch
    /// without a querier). Each host has `eth0` with 10.77.<lan>.<i>/24 ([`host_ip4`]), a multicast route, `lo`
    /// up, and IPv6 duplicate address detection off (link-local addresses usable at once).
    pub fn new(n: usize) -> Self {
        let id = LAN_COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("lnc{}-{id}", std::process::id());
        let bridge_ns = format!("{prefix}-br");
        ip(&["netns", "add", &bridge_ns]);
        let mut lan = Lan {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
            subnet: (id % 250) as u8,
        };
        ip(&[
            "-n",
            &bridge_ns,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        ip(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for i in 1..=n {
            let ns = format!("{prefix}-h{i}");
            ip(&["netns", "add", &ns]);
            let (ip4, prefix) = host_ip4(id, i, n);
            // Registered before anything else can fail, so drop deletes it.
            let host = NetHost {
                ns: ns.clone(),
                iface: "eth0".into(),
                ip4,
            };
            lan.hosts.push(host.clone());
            for k in ["all", "default"] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", &ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv6.conf.{k}.accept_dad=0"))
                    .status();
            }
            let peer = format!("vb{i}");
            ip(&[
                "-n", &ns, "link", "add", "eth0", "type", "veth", "peer", "name", &peer, "netns", &bridge_ns,
            ]);
            ip(&["-n", &bridge_ns, "link", "set", &peer, "master", "br0"]);
            ip(&["-n", &bridge_ns, "link", "set", &peer, "up"]);
            ip(&["-n", &ns, "addr", "add", &format!("{ip4}/{prefix}"), "dev", "eth0"]);
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
            ip(&["-n", &ns, "link", "set", "lo", "up"]);
            ip(&["-n", &ns, "route", "add", "224.0.0.0/4", "dev", "eth0"]);
        }
        // Wait for IPv6 link-local addresses on every host.
        for h in &lan.hosts {
            // At most about 2 s (as the 100 checks of 20 ms were); then on regardless.
            let _ = wait_for(Duration::from_secs(2), Duration::from_millis(20), || {
                let out = Command::new("ip")
                    .args(["-n", &h.ns, "-6", "addr", "show", "dev", "eth0", "scope", "link"])
                    .output()
                    .expect("ip addr");
                let text = String::from_utf8_lossy(&out.stdout);
                text.contains("fe80") && !text.contains("tentative")
            });
        }
        lan
    }
}

impl Lan {
    /// Plugs namespace `ns` into this LAN's bridge with a new veth `ifname` (up, `lo` up), with
    /// `cidr` (e.g. `10.78.0.1/24`) and a multicast route (unless one exists) when given; without, the link has only
    /// its IPv6 link-local address. A roaming host's link appearing.
    pub fn attach(&self, ns: &str, ifname: &str, cidr: Option<&str>) {
        let peer = format!("va{}", LAN_COUNTER.fetch_add(1, Ordering::Relaxed));
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            ifname,
            "type",
            "veth",
            "peer",
            "name",
            &peer,
            "netns",
            &self.bridge_ns,
        ]);
        ip(&["-n", &self.bridge_ns, "link", "set", &peer, "master", "br0"]);
        ip(&["-n", &self.bridge_ns, "link", "set", &peer, "up"]);
        if let Some(c) = cidr {
            ip(&["-n", ns, "addr", "add", c, "dev", ifname]);
        }
        ip(&["-n", ns, "link", "set", ifname, "up"]);
        ip(&["-n", ns, "link", "set", "lo", "up"]);
        if cidr.is_some() {
            // Fails when another link already has the multicast route (a second LAN): fine, the
            // beacon picks the interface itself.
            let _ = Command::new("ip")
                .args(["-n", ns, "route", "add", "224.0.0.0/4", "dev", ifname])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Venues (tests/it/venues.rs): what real networks do to the hall, simulated on the bridge.
impl Lan {
    /// This LAN's address `10.77.<subnet>.<last>`.
    pub fn addr(&self, last: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 77, self.subnet, last)
    }

    /// Guest Wi-Fi that filters multicast: the bridge drops frames to the beacon groups' MAC
    /// addresses (IPv4 239.255.83.80 is 01:00:5e:7f:53:50, IPv6 ff02::8380 is
    /// 33:33:00:00:83:80), counting them; ARP and neighbour discovery still pass.
    pub fn filter_beacon_multicast(&self) {
        nft_in(
            &self.bridge_ns,
            "table bridge venue {\n\
             \tchain forward {\n\
             \t\ttype filter hook forward priority 0; policy accept;\n\
             \t\tether daddr { 01:00:5e:7f:53:50, 33:33:00:00:83:80 } counter drop\n\
             \t}\n\
             }\n",
        );
    }

    /// Frames the multicast filter dropped so far.
    pub fn multicast_dropped(&self) -> u64 {
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bridge_ns,
                "nft",
                "list",
                "table",
                "bridge",
                "venue",
            ])
            .output()
            .expect("nft list");
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .skip_while(|w| *w != "packets")
            .nth(1)
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }

    /// Client isolation: host `i` (0-based) reaches only the bridge's non-isolated ports, not
    /// other isolated ones (`bridge link set dev PORT isolated on`).
    pub fn isolate(&self, i: usize) {
        let port = format!("vb{}", i + 1);
        let st = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.bridge_ns,
                "bridge",
                "link",
                "set",
                "dev",
                &port,
                "isolated",
                "on",
            ])
            .status()
            .expect("bridge");
        assert!(st.success(), "bridge link set dev {port} isolated on");
    }
}

/// Loads the nftables `ruleset` in namespace `ns` (asserts success).
pub fn nft_in(ns: &str, ruleset: &str) {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "nft", "-f", "-"])
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run nft");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(ruleset.as_bytes())
        .expect("write ruleset");
    let out = child.wait_with_output().expect("nft");
    assert!(
        out.status.success(),
        "nft -f in {ns}: {}\n{ruleset}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A NixOS-style stateful host firewall in `ns` (what `networking.firewall` does with no port
/// open): loopback, established and related traffic, ICMP and neighbour discovery in;
/// everything else dropped, the beacon's UDP 8380 and the store server's TCP 8380 included.
pub fn stateful_firewall(ns: &str) {
    nft_in(
        ns,
        "table inet nixos-fw {\n\
         \tchain input {\n\
         \t\ttype filter hook input priority 0; policy drop;\n\
         \t\tiifname \"lo\" accept\n\
         \t\tct state { established, related } accept\n\
         \t\tmeta l4proto { icmp, ipv6-icmp } accept\n\
         \t}\n\
         }\n",
    );
}

/// A router namespace joining two LANs: `.254` on each, forwarding on; hosts need a route to
/// the other subnet through it ([`Router::route_from`]). Deleted on drop.
pub struct Router {
    pub ns: String,
}

impl Router {
    pub fn new(a: &Lan, b: &Lan) -> Self {
        let ns = format!(
            "lnc{}-rt{}",
            std::process::id(),
            LAN_COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns]);
        let r = Self { ns };
        a.attach(&r.ns, "ra", Some(&format!("{}/24", a.addr(254))));
        b.attach(&r.ns, "rb", Some(&format!("{}/24", b.addr(254))));
        sysctl_in(&r.ns, "net.ipv4.ip_forward", "1");
        r
    }

    /// Routes host namespace `ns` (on `from`) to the other LAN `to` through this router.
    pub fn route_from(&self, ns: &str, from: &Lan, to: &Lan) {
        ip_in(
            ns,
            &[
                "route",
                "add",
                &format!("{}/24", to.addr(0)),
                "via",
                &from.addr(254).to_string(),
            ],
        );
    }
}

impl Drop for Router {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.ns]).status();
    }
}

/// Removes interface `ifname` from namespace `ns` (its veth peer goes with it): a link gone.
pub fn detach(ns: &str, ifname: &str) {
    ip(&["-n", ns, "link", "del", ifname]);
}

/// `ip -n NS ARGS...` inside a test's own namespace (asserts success).
pub fn ip_in(ns: &str, args: &[&str]) {
    let mut all = vec!["-n", ns];
    all.extend_from_slice(args);
    ip(&all);
}

/// Sets a sysctl inside a test's own namespace.
pub fn sysctl_in(ns: &str, key: &str, value: &str) {
    let st = Command::new("ip")
        .args(["netns", "exec", ns, "sysctl", "-qw"])
        .arg(format!("{key}={value}"))
        .status()
        .expect("sysctl");
    assert!(st.success(), "sysctl {key}={value} in {ns}");
}

impl Drop for Lan {
    fn drop(&mut self) {
        for h in &self.hosts {
            let _ = Command::new("ip").args(["netns", "del", &h.ns]).status();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.bridge_ns]).status();
    }
}

/// Runs `f` on a new thread inside the network namespace `ns`: sockets it opens live there.
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> std::thread::JoinHandle<T> {
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {path}: {e}"));
        nix::sched::setns(file, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
        f()
    })
}

/// An in-process beacon running as one host of a LAN.
pub struct TestBeacon {
    pub table: Arc<PeerTable>,
    /// Cancelled for a clean stop (the beacon says goodbye).
    graceful: CancellationToken,
    /// Cancelled to end the host's thread; without `graceful`, the beacon task is aborted
    /// mid-flight, as if the host died.
    end: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestBeacon {
    /// Starts a beacon on `host` announcing store port 8380 with `cfg` (interfaces default to
    /// the host's eth0).
    pub fn start(host: &NetHost, cfg: BeaconConfig) -> Self {
        Self::start_inner(host, cfg, false)
    }

    /// As [`TestBeacon::start`], and answers `GET /peers` on TCP 8380 (the store port it
    /// announces) with `beacon::pex::render` of its table, as a store server does.
    pub fn start_serving_peers(host: &NetHost, cfg: BeaconConfig) -> Self {
        Self::start_inner(host, cfg, true)
    }

    fn start_inner(host: &NetHost, mut cfg: BeaconConfig, serve_peers: bool) -> Self {
        if cfg.interfaces.is_empty() {
            cfg.interfaces = vec![host.iface.clone()];
        }
        if cfg.announce.is_none() {
            cfg.announce = Some(beacon::Announce {
                store_port: 8380,
                flags: beacon::wire::FLAG_NAR_NONE,
                hostname: Some(host.ns.clone()),
                summary: None,
                secret: rand::random(),
            });
        }
        let table = Arc::new(PeerTable::new(NodeId::random()));
        let (graceful, end) = (CancellationToken::new(), CancellationToken::new());
        let (t, g, e) = (table.clone(), graceful.clone(), end.clone());
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = in_netns(&host.ns, move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let sockets = beacon::bind(&cfg).expect("bind beacon");
                if serve_peers {
                    let l = tokio::net::TcpListener::bind("0.0.0.0:8380").await.expect("bind peers");
                    let table = t.clone();
                    tokio::spawn(async move {
                        while let Ok((mut c, _)) = l.accept().await {
                            let table = table.clone();
                            tokio::spawn(async move { answer_peers(&mut c, &table).await });
                        }
                    });
                }
                tx.send(()).expect("started");
                let task = tokio::spawn(beacon::run(sockets, cfg, t, None, g.clone(), true));
                e.cancelled().await;
                if g.is_cancelled() {
                    let _ = task.await;
                } else {
                    task.abort();
                }
            });
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("beacon started");
        Self {
            table,
            graceful,
            end,
            thread: Some(thread),
        }
    }

    fn join(&mut self) {
        self.end.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Clean shutdown: sends a goodbye.
    pub fn stop(mut self) {
        self.graceful.cancel();
        self.join();
    }

    /// As if the host died: no goodbye.
    pub fn kill(mut self) {
        self.join();
    }

    pub fn node(&self) -> NodeId {
        self.table.own()
    }
}

impl Drop for TestBeacon {
    fn drop(&mut self) {
        self.graceful.cancel();
        self.join();
    }
}

/// One datagram a [`Sniffer`] saw: when, its UDP payload length, and whether over IPv6.
#[derive(Clone, Copy, Debug)]
pub struct Seen {
    pub at: std::time::Instant,
    pub len: usize,
    pub v6: bool,
}

impl Seen {
    /// Bytes on the link: payload plus IP and UDP headers.
    pub fn wire_bytes(&self) -> usize {
        self.len + if self.v6 { 48 } else { 28 }
    }
}

/// A passive listener on one host of a LAN: joins the beacon groups on its eth0 and records
/// every beacon datagram on the link for `dur` (at most [`Sniffer::MAX_SEEN`]). Sends nothing.
pub struct Sniffer {
    thread: std::thread::JoinHandle<Vec<Seen>>,
}

impl Sniffer {
    /// Most datagrams recorded (the test's memory bound).
    pub const MAX_SEEN: usize = 200_000;

    pub fn start(host: &NetHost, dur: Duration) -> Self {
        use socket2::{Domain, Protocol, Socket, Type};
        let (tx, rx) = std::sync::mpsc::channel();
        let iface = host.iface.clone();
        let thread = in_netns(&host.ns, move || {
            let index = nix::net::if_::if_nametoindex(iface.as_str()).expect("ifindex");
            let mk = |d: Domain| {
                let s = Socket::new(d, Type::DGRAM, Some(Protocol::UDP)).expect("socket");
                s.set_reuse_address(true).expect("reuse");
                s.set_reuse_port(true).expect("reuseport");
                s
            };
            let s4 = mk(Domain::IPV4);
            s4.bind(&std::net::SocketAddr::from(([0, 0, 0, 0], beacon::DEFAULT_PORT)).into())
                .expect("bind v4");
            s4.join_multicast_v4_n(
                &beacon::DEFAULT_GROUP_V4,
                &socket2::InterfaceIndexOrAddress::Index(index),
            )
            .expect("join v4");
            let s6 = mk(Domain::IPV6);
            s6.set_only_v6(true).expect("v6only");
            s6.bind(&std::net::SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, beacon::DEFAULT_PORT)).into())
                .expect("bind v6");
            s6.join_multicast_v6(&beacon::DEFAULT_GROUP_V6, index).expect("join v6");
            let (s4, s6): (std::net::UdpSocket, std::net::UdpSocket) = (s4.into(), s6.into());
            s4.set_nonblocking(true).expect("nonblocking");
            s6.set_nonblocking(true).expect("nonblocking");
            tx.send(()).expect("sniffer ready");
            let end = std::time::Instant::now() + dur;
            let mut seen = Vec::new();
            let mut buf = [0u8; 2048];
            while std::time::Instant::now() < end && seen.len() < Self::MAX_SEEN {
                let mut idle = true;
                for (s, v6) in [(&s4, false), (&s6, true)] {
                    while let Ok((n, _)) = s.recv_from(&mut buf) {
                        idle = false;
                        seen.push(Seen {
                            at: std::time::Instant::now(),
                            len: n,
                            v6,
                        });
                    }
                }
                if idle {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            seen
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("sniffer started");
        Self { thread }
    }

    /// Waits for the end of the recording and returns it.
    pub fn finish(self) -> Vec<Seen> {
        self.thread.join().expect("sniffer thread")
    }
}

/// Answers one HTTP request on `c` with the peer list of `table` (tests' stand-in for the store
/// server's `GET /peers`; same rendering).
async fn answer_peers(c: &mut tokio::net::TcpStream, table: &PeerTable) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut req = Vec::new();
    let mut buf = [0u8; 1024];
    let read = async {
        while !req.windows(4).any(|w| w == b"\r\n\r\n") && req.len() < 8192 {
            match c.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => req.extend_from_slice(&buf[..n]),
            }
        }
    };
    if tokio::time::timeout(Duration::from_secs(2), read).await.is_err() {
        return;
    }
    let body = beacon::pex::render(table);
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = c.write_all(head.as_bytes()).await;
    let _ = c.write_all(body.as_bytes()).await;
    let _ = c.shutdown().await;
}
