//! The beacon's own HTTP requests to store servers (`GET /peers` for peer exchange,
//! `GET /identity` for proofs): the URL of a path at a peer's address, and a body read within a
//! size bound. A leaf: it knows nothing of the table.

use std::net::SocketAddr;

/// The URL of `path` on the store server at `addr`.
pub fn url(addr: SocketAddr, path: &str) -> String {
    match addr {
        SocketAddr::V4(a) => format!("http://{a}{path}"),
        // Link-local: the scope goes in the URL as `%25`-escaped zone.
        SocketAddr::V6(a) if a.scope_id() != 0 => format!("http://[{}%25{}]:{}{path}", a.ip(), a.scope_id(), a.port()),
        SocketAddr::V6(a) => format!("http://{a}{path}"),
    }
}

/// The body of a successful `GET url` as text, if it is UTF-8 and at most `max` bytes (the
/// beacon's own requests to store servers: `/peers`, `/identity`). The caller bounds the time.
pub async fn get_text(client: &reqwest::Client, url: &str, max: usize) -> Option<String> {
    let mut resp = client.get(url).send().await.ok()?;
    if !resp.status().is_success() {
        return None;
    }
    let mut body = Vec::new();
    while let Ok(Some(chunk)) = resp.chunk().await {
        if body.len() + chunk.len() > max {
            return None;
        }
        body.extend_from_slice(&chunk);
    }
    String::from_utf8(body).ok()
}
