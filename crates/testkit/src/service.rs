//! A Kubernetes `Service` stand-in for tests: one stable address in front of a changing set
//! of backends, as kube-proxy gives a ClusterIP.
//!
//! Every accepted TCP connection goes to the next ready backend (round robin) and bytes are
//! copied both ways until either side closes, so TLS and HTTP/2 pass through untouched and
//! a backend that dies closes its clients' connections, as a dead pod does. The test plays
//! the EndpointSlice controller: [`Service::set_backends`] says which backends are ready.
//! A connection that reaches a backend that refuses it is closed, as it would be in a
//! cluster whose endpoints are not yet updated.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// A running Service stand-in. Stops accepting when dropped (open connections end with
/// their backend).
#[derive(Debug)]
pub struct Service {
    addr: SocketAddr,
    shared: Arc<Shared>,
    task: JoinHandle<()>,
}

#[derive(Debug, Default)]
struct Shared {
    backends: Mutex<Vec<SocketAddr>>,
    next: AtomicUsize,
    /// Connections routed, by backend, in order.
    routed: Mutex<Vec<SocketAddr>>,
}

impl Drop for Service {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Service {
    /// Starts a Service on an ephemeral loopback port in front of `backends`.
    pub async fn start(backends: &[SocketAddr]) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared::default());
        shared
            .backends
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(backends);
        let task = tokio::spawn(accept(listener, shared.clone()));
        Ok(Self { addr, shared, task })
    }

    /// The Service's address (what clients are configured with).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the ready backends; existing connections are not touched.
    pub fn set_backends(&self, backends: &[SocketAddr]) {
        *self.shared.backends.lock().unwrap_or_else(|p| p.into_inner()) = backends.to_vec();
    }

    /// The backend each connection so far was sent to, in order.
    pub fn routed(&self) -> Vec<SocketAddr> {
        self.shared
            .routed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

async fn accept(listener: TcpListener, shared: Arc<Shared>) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            continue;
        };
        let backend = {
            let backends = shared.backends.lock().unwrap_or_else(|p| p.into_inner());
            if backends.is_empty() {
                None
            } else {
                let i = shared.next.fetch_add(1, Ordering::Relaxed) % backends.len();
                Some(backends[i])
            }
        };
        // No ready backend: the connection is refused (closed at once).
        let Some(backend) = backend else {
            continue;
        };
        shared
            .routed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(backend);
        tokio::spawn(proxy(client, backend));
    }
}

async fn proxy(mut client: TcpStream, backend: SocketAddr) {
    let Ok(mut upstream) = TcpStream::connect(backend).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// An echo server that prefixes its replies with `tag`.
    async fn echo(tag: &'static str) -> (SocketAddr, JoinHandle<()>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let task = tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = [0u8; 64];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 {
                            break;
                        }
                        let mut out = tag.as_bytes().to_vec();
                        out.extend_from_slice(&buf[..n]);
                        if s.write_all(&out).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        (addr, task)
    }

    async fn ask(service: SocketAddr) -> String {
        let mut s = TcpStream::connect(service).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        let mut buf = vec![0u8; 64];
        let n = s.read(&mut buf).await.unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[tokio::test]
    async fn spreads_connections_and_follows_the_ready_backends() {
        let (a, task_a) = echo("a:").await;
        let (b, _task_b) = echo("b:").await;
        let service = Service::start(&[a, b]).await.unwrap();
        let replies = [
            ask(service.addr()).await,
            ask(service.addr()).await,
            ask(service.addr()).await,
        ];
        assert_eq!(replies, ["a:ping", "b:ping", "a:ping"]);

        // An open connection stays with its backend when the ready set changes.
        let mut held = TcpStream::connect(service.addr()).await.unwrap();
        held.write_all(b"x").await.unwrap();
        let mut buf = [0u8; 8];
        let n = held.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"b:x");

        // Only `a` ready: every new connection goes there.
        service.set_backends(&[a]);
        assert_eq!(ask(service.addr()).await, "a:ping");
        assert_eq!(ask(service.addr()).await, "a:ping");
        assert_eq!(service.routed(), [a, b, a, b, a, a]);
        held.write_all(b"y").await.unwrap();
        let n = held.read(&mut buf).await.unwrap();
        assert_eq!(&buf[..n], b"b:y");

        // No backend: connections are closed at once.
        service.set_backends(&[]);
        let mut s = TcpStream::connect(service.addr()).await.unwrap();
        let _ = s.write_all(b"ping").await;
        assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
        task_a.abort();
    }
}
