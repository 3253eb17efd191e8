//! The QMP listeners: unix and TCP sockets, each serving many clients at once.
//!
//! A unix socket path left by a dead process (nobody accepts on it) is replaced; a live one, or
//! a path that is not a socket, is refused. The socket file is removed when the listener is
//! dropped (at exit), unless another process has replaced it meanwhile.
//!
//! Each listener is a QEMU chardev to `query-chardev`: `compat_monitorN`, its filename in
//! QEMU 7.2's encoding (`unix:PATH,server=on`, `tcp:H:P,server=on <-> PEER:PORT`, with
//! `disconnected:` in front while no client is connected).

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::{TcpListener, UnixListener};

use crate::cli::{Endpoint, QmpSpec};
use crate::session::{self, Backend, SessionConfig};

/// Clients served at once per listener; more are closed at once (with a warning).
pub const MAX_CLIENTS: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("-qmp {spec}: '{path}' exists and is not a socket; not removing it")]
    NotASocket { spec: String, path: PathBuf },
    #[error("-qmp {spec}: Failed to bind socket to {path}: Address already in use (a live process accepts on it)")]
    InUse { spec: String, path: PathBuf },
    #[error("-qmp {spec}: could not remove the stale socket '{path}': {source}")]
    RemoveStale { spec: String, path: PathBuf, source: std::io::Error },
    #[error("-qmp {spec}: Failed to bind socket to {addr}: {source}")]
    Bind { spec: String, addr: String, source: std::io::Error },
}

/// A bound unix socket file, removed on drop if it is still ours.
#[derive(Debug)]
pub struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(md) if md.dev() == self.dev && md.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    tracing::warn!("could not remove {}: {e}", self.path.display());
                }
            }
            _ => {} // gone, or someone else's now
        }
    }
}

/// One QMP listener as a chardev.
#[derive(Debug)]
pub struct Monitor {
    label: String,
    /// The filename without `disconnected:`, and for TCP without the peer.
    local: String,
    tcp: bool,
    clients: Mutex<BTreeMap<u64, String>>,
    next_client: AtomicU64,
}

impl Monitor {
    pub fn label(&self) -> &str {
        &self.label
    }

    /// query-chardev's `filename`.
    pub fn filename(&self) -> String {
        let clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        match clients.values().next_back() {
            None => format!("disconnected:{}", self.local),
            Some(peer) if self.tcp => format!("{} <-> {peer}", self.local),
            Some(_) => self.local.clone(),
        }
    }

    fn connected(&self, peer: String) -> u64 {
        let id = self.next_client.fetch_add(1, Ordering::Relaxed);
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).insert(id, peer);
        id
    }

    fn disconnected(&self, id: u64) {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }

    fn count(&self) -> usize {
        self.clients.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

/// A bound listener.
#[derive(Debug)]
pub enum Listener {
    Unix(UnixListener, SocketFile),
    Tcp(TcpListener),
}

/// Clears a stale socket at `path`, or says why not.
async fn clear_stale(spec: &QmpSpec, path: &Path) -> Result<(), ListenError> {
    let md = match std::fs::symlink_metadata(path) {
        Err(_) => return Ok(()),
        Ok(md) => md,
    };
    if !md.file_type().is_socket() {
        return Err(ListenError::NotASocket { spec: spec.text.clone(), path: path.to_path_buf() });
    }
    let probe = tokio::time::timeout(Duration::from_secs(1), tokio::net::UnixStream::connect(path)).await;
    if let Ok(Ok(_)) = probe {
        return Err(ListenError::InUse { spec: spec.text.clone(), path: path.to_path_buf() });
    }
    match std::fs::remove_file(path) {
        Ok(()) => {
            tracing::info!("replaced the stale socket {}", path.display());
            Ok(())
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(ListenError::RemoveStale { spec: spec.text.clone(), path: path.to_path_buf(), source }),
    }
}

/// Binds the listener of `spec` as chardev `label`.
pub async fn bind(spec: &QmpSpec, label: String) -> Result<(Listener, Arc<Monitor>), ListenError> {
    if spec.wait {
        tracing::warn!("-qmp {}: wait=on is not honoured: the gateway never holds the guest back", spec.text);
    }
    let monitor = |local: String, tcp: bool| {
        Arc::new(Monitor { label, local, tcp, clients: Mutex::new(BTreeMap::new()), next_client: AtomicU64::new(0) })
    };
    match &spec.endpoint {
        Endpoint::Unix(path) => {
            clear_stale(spec, path).await?;
            let bind_err =
                |source| ListenError::Bind { spec: spec.text.clone(), addr: path.display().to_string(), source };
            let listener = UnixListener::bind(path).map_err(bind_err)?;
            let md = std::fs::symlink_metadata(path).map_err(bind_err)?;
            let file = SocketFile { path: path.clone(), dev: md.dev(), ino: md.ino() };
            let local = format!("unix:{},server=on", path.display());
            Ok((Listener::Unix(listener, file), monitor(local, false)))
        }
        Endpoint::Tcp { host, port } => {
            let addr = format!("{host}:{port}");
            let bind_err = |source| ListenError::Bind { spec: spec.text.clone(), addr: addr.clone(), source };
            let listener = TcpListener::bind((host.as_str(), *port)).await.map_err(bind_err)?;
            let bound = listener.local_addr().map_err(bind_err)?;
            let local = format!("tcp:{bound},server=on");
            tracing::info!("-qmp {}: listening on {bound}", spec.text);
            Ok((Listener::Tcp(listener), monitor(local, true)))
        }
    }
}

impl Listener {
    /// The TCP port actually bound (for `tcp:...:0`).
    pub fn tcp_port(&self) -> Option<u16> {
        match self {
            Listener::Tcp(l) => l.local_addr().ok().map(|a| a.port()),
            Listener::Unix(..) => None,
        }
    }
}

fn spawn_session<B, R, W>(monitor: &Arc<Monitor>, peer: String, r: R, w: W, backend: &Arc<B>, cfg: SessionConfig)
where
    B: Backend,
    R: tokio::io::AsyncRead + Unpin + Send + 'static,
    W: tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    if monitor.count() >= MAX_CLIENTS {
        tracing::warn!(chardev = monitor.label(), "{MAX_CLIENTS} QMP clients already connected; refusing {peer}");
        return; // dropping the halves closes the connection
    }
    let id = monitor.connected(peer.clone());
    let (monitor, backend) = (monitor.clone(), backend.clone());
    tokio::spawn(async move {
        tracing::debug!(chardev = monitor.label(), %peer, "QMP client connected");
        if let Err(e) = session::serve(r, w, backend, cfg).await {
            tracing::info!(chardev = monitor.label(), %peer, "QMP client dropped: {e}");
        }
        monitor.disconnected(id);
        tracing::debug!(chardev = monitor.label(), %peer, "QMP client gone");
    });
}

/// Accepts clients forever.
pub async fn serve<B: Backend>(listener: Listener, monitor: Arc<Monitor>, backend: Arc<B>, cfg: SessionConfig) {
    loop {
        let accepted = match &listener {
            Listener::Unix(l, _) => l.accept().await.map(|(s, _)| {
                let (r, w) = s.into_split();
                spawn_session(&monitor, "unix".to_string(), r, w, &backend, cfg);
            }),
            Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                spawn_session(&monitor, peer.to_string(), r, w, &backend, cfg);
            }),
        };
        if let Err(e) = accepted {
            // Out of descriptors and the like: pause rather than spin.
            tracing::warn!(chardev = monitor.label(), "accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::parse_qmp_spec;

    fn tmp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("qmp-gateway-listen-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[tokio::test]
    async fn unix_socket_lifecycle() {
        let dir = tmp("life");
        let path = dir.join("q.sock");
        let spec = parse_qmp_spec(&format!("unix:{},server,nowait", path.display())).unwrap();

        // A stale socket (bound, nobody listening) is replaced.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let (l, m) = bind(&spec, "compat_monitor0".into()).await.unwrap();
        assert_eq!(m.filename(), format!("disconnected:unix:{},server=on", path.display()));
        let id = m.connected("unix".into());
        assert_eq!(m.filename(), format!("unix:{},server=on", path.display()));
        m.disconnected(id);

        // While it is live, a second bind is refused and leaves it alone.
        let e = bind(&spec, "x".into()).await.unwrap_err();
        assert!(matches!(e, ListenError::InUse { .. }), "{e}");
        assert!(path.exists());

        // Dropping removes the file.
        drop(l);
        assert!(!path.exists());

        // Not a socket: refused, not removed.
        std::fs::write(&path, b"data").unwrap();
        let e = bind(&spec, "x".into()).await.unwrap_err();
        assert!(e.to_string().contains("exists and is not a socket"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"data");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_replaced_socket_is_not_removed() {
        let dir = tmp("replaced");
        let path = dir.join("q.sock");
        let spec = parse_qmp_spec(&format!("unix:{},server=on,wait=off", path.display())).unwrap();
        let (l, _) = bind(&spec, "m".into()).await.unwrap();
        std::fs::remove_file(&path).unwrap();
        let other = std::os::unix::net::UnixListener::bind(&path).unwrap();
        drop(l);
        assert!(path.exists(), "someone else's socket stays");
        drop(other);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn tcp_filenames() {
        let spec = parse_qmp_spec("tcp::0,server,nowait").unwrap();
        let (l, m) = bind(&spec, "compat_monitor1".into()).await.unwrap();
        let port = l.tcp_port().unwrap();
        assert_eq!(m.filename(), format!("disconnected:tcp:127.0.0.1:{port},server=on"));
        m.connected("127.0.0.1:5555".into());
        assert_eq!(m.filename(), format!("tcp:127.0.0.1:{port},server=on <-> 127.0.0.1:5555"));
        // A port in use is an error naming it.
        let busy = parse_qmp_spec(&format!("tcp:127.0.0.1:{port},server,nowait")).unwrap();
        let e = bind(&busy, "y".into()).await.unwrap_err();
        assert!(e.to_string().contains(&format!("Failed to bind socket to 127.0.0.1:{port}")), "{e}");
    }
}
