//! Facts the agent reports about its host: name and addresses. They are claims; the
//! endpoint trusts a platform's verified address over them.

use std::net::{IpAddr, SocketAddr, UdpSocket};

use gangplank_api::proto;

use crate::config;

/// The host's facts for an Onboard request.
pub async fn facts(onboarding: &config::Onboarding) -> proto::HostFacts {
    let preferred = route_to(&onboarding.endpoint.host, onboarding.endpoint.port).await;
    let addresses = order(preferred, interface_addresses());
    proto::HostFacts {
        hostname: hostname(),
        addresses: addresses.iter().map(IpAddr::to_string).collect(),
        connected_over: onboarding.connected_over.as_str().to_owned(),
        agent_version: gangplank_api::VERSION.to_owned(),
        labels: onboarding.labels.clone().into_iter().collect(),
    }
}

/// The host name, or an empty string when the OS gives none.
pub fn hostname() -> String {
    hostname::get()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// The host's addresses, most preferred first: the one the OS routes to the endpoint,
/// then every other non-loopback, non-link-local address. Loopback addresses are only
/// reported when the host has nothing else.
pub fn order(preferred: Option<IpAddr>, mut all: Vec<IpAddr>) -> Vec<IpAddr> {
    all.retain(usable);
    let mut out = Vec::with_capacity(all.len() + 1);
    if let Some(p) = preferred.filter(usable) {
        out.push(p);
    }
    for ip in all {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    if out.is_empty()
        && let Some(p) = preferred
    {
        out.push(p);
    }
    out
}

fn usable(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => !v4.is_loopback() && !v4.is_unspecified() && !v4.is_link_local(),
        IpAddr::V6(v6) => !v6.is_loopback() && !v6.is_unspecified() && (v6.segments()[0] & 0xffc0) != 0xfe80,
    }
}

/// The addresses of the host's interfaces that are up.
pub fn interface_addresses() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        tracing::debug!("cannot list the host's interfaces");
        return Vec::new();
    };
    let mut out = Vec::new();
    for a in addrs {
        if !a.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(storage) = a.address else { continue };
        let ip = if let Some(v4) = storage.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = storage.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The local address the OS would use to reach `host:port` (no packet is sent).
pub async fn route_to(host: &str, port: u16) -> Option<IpAddr> {
    let targets: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await.ok()?.collect();
    targets.into_iter().find_map(|target| {
        let bind: SocketAddr = if target.is_ipv4() {
            ([0, 0, 0, 0], 0).into()
        } else {
            ([0u16; 8], 0).into()
        };
        let socket = UdpSocket::bind(bind).ok()?;
        socket.connect(target).ok()?;
        socket.local_addr().ok().map(|a| a.ip())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn preferred_comes_first_and_loopback_is_dropped() {
        let all = vec![
            ip("127.0.0.1"),
            ip("10.0.0.5"),
            ip("192.168.1.9"),
            ip("::1"),
            ip("fe80::1"),
        ];
        assert_eq!(
            order(Some(ip("192.168.1.9")), all.clone()),
            vec![ip("192.168.1.9"), ip("10.0.0.5")]
        );
        assert_eq!(order(None, all.clone()), vec![ip("10.0.0.5"), ip("192.168.1.9")]);
        assert_eq!(
            order(Some(ip("127.0.0.1")), all),
            vec![ip("10.0.0.5"), ip("192.168.1.9")]
        );
    }

    #[test]
    fn loopback_only_host_still_reports_its_route() {
        assert_eq!(
            order(Some(ip("127.0.0.1")), vec![ip("127.0.0.1")]),
            vec![ip("127.0.0.1")]
        );
        assert!(order(None, vec![ip("127.0.0.1")]).is_empty());
    }

    #[tokio::test]
    async fn route_to_localhost_is_loopback() {
        assert_eq!(route_to("127.0.0.1", 15443).await, Some(ip("127.0.0.1")));
        assert!(interface_addresses().contains(&ip("127.0.0.1")));
    }
}
