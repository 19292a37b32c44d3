//! A fleet of stand-in "VMs" for SSH tests: each is a real OpenSSH `sshd` (Debian's
//! `/usr/sbin/sshd`) on its own loopback address, with its own generated host key, a key-only
//! login for the current user, and a `bin/` of stand-in `docker` and `systemctl` scripts that
//! record their arguments into the VM's folder.
//!
//! How the stand-ins get on the PATH: each VM's `authorized_keys` line carries
//! `environment="PATH=<vm>/bin:..."` and sshd runs with `PermitUserEnvironment PATH`, so only
//! sessions of this fleet see them. sshd runs in the foreground (`-D -e`); its log is captured
//! and also written to `<vm>/sshd.log`.
//!
//! The client side is described by [`Fleet::ssh_config`]: an `ssh -F` file naming the client
//! key and a known_hosts file holding every VM's host key, so tests never read `~/.ssh`.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, Ipv4Addr, TcpListener};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};

/// The sshd binary the tests use.
pub const SSHD: &str = "/usr/sbin/sshd";

/// How long a VM may take to start listening.
const START_TIMEOUT: Duration = Duration::from_secs(20);

static NEXT_ADDR: AtomicU32 = AtomicU32::new(0);

/// A set of VMs sharing one client key.
pub struct Fleet {
    dir: tempfile::TempDir,
    /// The VMs, in creation order.
    pub vms: Vec<Vm>,
}

/// One stand-in VM: an sshd and its folder.
pub struct Vm {
    /// Short name (`vm0`, `vm1`, ...).
    pub name: String,
    /// Loopback address sshd listens on.
    pub addr: IpAddr,
    /// Port sshd listens on.
    pub port: u16,
    /// The VM's folder; remote files are written under it.
    pub root: PathBuf,
    /// The host public key line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Fleet {
    /// Starts `n` VMs.
    pub fn start(n: usize) -> Result<Self> {
        if !Path::new(SSHD).exists() {
            bail!("{SSHD} not found: install it with `apt-get install -y openssh-server`");
        }
        let dir = tempfile::Builder::new().prefix("gangplank-sshd-").tempdir()?;
        // sshd refuses to start as root without its privilege separation directory.
        if nix_is_root() {
            std::fs::create_dir_all("/run/sshd").context("creating /run/sshd")?;
        }
        keygen(&dir.path().join("client_key"))?;
        keygen(&dir.path().join("other_key"))?;
        let client_pub = std::fs::read_to_string(dir.path().join("client_key.pub"))?;
        let mut vms = Vec::with_capacity(n);
        for i in 0..n {
            vms.push(Vm::start(dir.path(), &format!("vm{i}"), client_pub.trim())?);
        }
        let fleet = Self { dir, vms };
        fleet.write_known_hosts(&fleet.known_hosts())?;
        std::fs::write(
            fleet.ssh_config(),
            format!(
                "Host *\n  IdentityFile {key}\n  IdentitiesOnly yes\n  UserKnownHostsFile {kh}\n  GlobalKnownHostsFile /dev/null\n  LogLevel ERROR\n  ConnectTimeout 10\n",
                key = fleet.client_key().display(),
                kh = fleet.known_hosts().display()
            ),
        )?;
        Ok(fleet)
    }

    /// The fleet's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The client private key every VM accepts.
    pub fn client_key(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    /// A valid private key no VM accepts.
    pub fn other_key(&self) -> PathBuf {
        self.dir.path().join("other_key")
    }

    /// The known_hosts file with every VM's real host key.
    pub fn known_hosts(&self) -> PathBuf {
        self.dir.path().join("known_hosts")
    }

    /// An `ssh -F` config: client key, known_hosts, batch-friendly settings.
    pub fn ssh_config(&self) -> PathBuf {
        self.dir.path().join("ssh_config")
    }

    /// Writes a known_hosts file for all VMs to `path`.
    pub fn write_known_hosts(&self, path: &Path) -> Result<()> {
        let mut text = String::new();
        for vm in &self.vms {
            text.push_str(&format!("[{}]:{} {}\n", vm.addr, vm.port, vm.host_key));
        }
        std::fs::write(path, text)?;
        Ok(())
    }

    /// Replaces `vm`'s entry in the fleet's known_hosts with a different, freshly generated
    /// key (a man in the middle, as far as the client can tell).
    pub fn forge_host_key(&self, index: usize) -> Result<()> {
        let forged = self.dir.path().join(format!("forged_{index}"));
        keygen(&forged)?;
        let forged_pub = std::fs::read_to_string(forged.with_extension("pub"))?;
        let mut text = String::new();
        for (i, vm) in self.vms.iter().enumerate() {
            let key = if i == index {
                forged_pub.trim()
            } else {
                vm.host_key.as_str()
            };
            text.push_str(&format!("[{}]:{} {}\n", vm.addr, vm.port, key));
        }
        std::fs::write(self.known_hosts(), text)?;
        Ok(())
    }
}

impl Fleet {
    /// Makes VM `index` accept only a key the client does not hold, so the client's key is
    /// refused there (a "bad key" for that host alone).
    pub fn refuse_client_key(&self, index: usize) -> Result<()> {
        let other = std::fs::read_to_string(self.dir.path().join("other_key.pub"))?;
        let vm = self.vms.get(index).context("no such VM")?;
        std::fs::write(vm.root.join("authorized_keys"), other)?;
        Ok(())
    }
}

impl Vm {
    fn start(fleet_dir: &Path, name: &str, client_pub: &str) -> Result<Self> {
        let root = fleet_dir.join(name);
        let bin = root.join("bin");
        std::fs::create_dir_all(&bin)?;
        keygen(&root.join("host_key"))?;
        let host_key = std::fs::read_to_string(root.join("host_key.pub"))?
            .split_whitespace()
            .take(2)
            .collect::<Vec<_>>()
            .join(" ");
        std::fs::write(
            root.join("authorized_keys"),
            format!(
                "environment=\"PATH={}:/usr/local/bin:/usr/bin:/bin\" {client_pub}\n",
                bin.display()
            ),
        )?;
        for tool in ["docker", "systemctl"] {
            let script = bin.join(tool);
            std::fs::write(&script, standin(tool, &root))?;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
        }
        let n = NEXT_ADDR.fetch_add(1, Ordering::Relaxed) + std::process::id() % 200;
        let addr = IpAddr::V4(Ipv4Addr::new(
            127,
            0,
            1 + (n / 250 % 250) as u8,
            2 + (n % 250) as u8,
        ));

        let mut last_err = None;
        // A freed port can be taken by someone else before sshd binds it: try a few.
        for _ in 0..5 {
            let port = TcpListener::bind((addr, 0))?.local_addr()?.port();
            match Self::spawn(&root, addr, port) {
                Ok((child, log)) => {
                    return Ok(Self {
                        name: name.to_string(),
                        addr,
                        port,
                        root,
                        host_key,
                        child,
                        log,
                    });
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.unwrap_or_else(|| anyhow::anyhow!("sshd for {name} did not start")))
    }

    fn spawn(root: &Path, addr: IpAddr, port: u16) -> Result<(Child, Arc<Mutex<Vec<String>>>)> {
        let config = root.join("sshd_config");
        std::fs::write(
            &config,
            format!(
                "ListenAddress {addr}:{port}\n\
                 HostKey {root}/host_key\n\
                 PidFile none\n\
                 AuthorizedKeysFile {root}/authorized_keys\n\
                 PubkeyAuthentication yes\n\
                 PasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\n\
                 UsePAM no\n\
                 StrictModes no\n\
                 PermitRootLogin prohibit-password\n\
                 PermitUserEnvironment PATH\n\
                 MaxSessions 64\n\
                 MaxStartups 200\n\
                 LogLevel VERBOSE\n",
                root = root.display()
            ),
        )?;
        let mut child = Command::new(SSHD)
            .arg("-D")
            .arg("-e")
            .arg("-f")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {SSHD}"))?;
        let stderr = child.stderr.take().context("sshd stderr")?;
        let log = Arc::new(Mutex::new(Vec::new()));
        let (ready_tx, ready_rx) = mpsc::channel();
        let log_file = root.join("sshd.log");
        let lines = Arc::clone(&log);
        std::thread::spawn(move || {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log_file)
                .ok();
            let mut ready = Some(ready_tx);
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(f) = file.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("Server listening on")
                    && let Some(tx) = ready.take()
                {
                    let _ = tx.send(Ok(()));
                }
                if let Ok(mut l) = lines.lock() {
                    l.push(line);
                }
            }
            if let Some(tx) = ready.take() {
                let _ = tx.send(Err(()));
            }
        });
        match ready_rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(())) => Ok((child, log)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                let text = log.lock().map(|l| l.join("\n")).unwrap_or_default();
                bail!("sshd on {addr}:{port} did not start:\n{text}")
            }
        }
    }

    /// `host:port` for display.
    pub fn endpoint(&self) -> String {
        format!("{}:{}", self.addr, self.port)
    }

    /// sshd's log so far.
    pub fn log(&self) -> String {
        self.log.lock().map(|l| l.join("\n")).unwrap_or_default()
    }

    /// How many connections reached this VM's sshd (`Connection from` lines).
    pub fn connections(&self) -> usize {
        self.log().matches("Connection from").count()
    }

    /// How many logins succeeded (`Accepted publickey` lines).
    pub fn logins(&self) -> usize {
        self.log().matches("Accepted publickey").count()
    }

    /// Every command the stand-in `docker` and `systemctl` recorded, as argv vectors
    /// (`["docker", "rm", "--force", "istio-proxy"]`).
    pub fn commands(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.root.join("commands.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    /// Makes the stand-in `tool` fail (exit 1) from now on.
    pub fn break_tool(&self, tool: &str) -> Result<()> {
        std::fs::write(self.root.join(format!("fail-{tool}")), "")?;
        Ok(())
    }

    /// Stops the sshd (the address then refuses connections).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        self.stop();
    }
}

fn standin(tool: &str, root: &Path) -> String {
    let root = root.display();
    format!(
        "#!/bin/sh\n\
         # Stand-in {tool}: records its argv (tab-separated) and answers like the real one.\n\
         {{ printf '%s' {tool}; for a in \"$@\"; do printf '\\t%s' \"$a\"; done; printf '\\n'; }} >> '{root}/commands.log'\n\
         if [ -e '{root}/fail-{tool}' ]; then echo '{tool}: simulated failure' >&2; exit 1; fi\n\
         case \"$1\" in\n  rm) echo istio-proxy ;;\n  run) echo 4f2a9c1e0b7d ;;\nesac\n"
    )
}

fn keygen(path: &Path) -> Result<()> {
    let out = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-C", "gangplank-test", "-f"])
        .arg(path)
        .stdin(Stdio::null())
        .output()
        .context("running ssh-keygen (install openssh-client)")?;
    if !out.status.success() {
        bail!("ssh-keygen failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn nix_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// A host on loopback that accepts TCP connections and holds them: silent (a hung host), or
/// sending an SSH banner and then nothing (stalled in the key exchange). Stops when dropped,
/// or after a minute.
#[derive(Debug)]
pub struct HungHost {
    /// Its port on 127.0.0.1.
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl HungHost {
    /// Starts one; `banner`: send an SSH banner on each connection first.
    pub fn start(banner: bool) -> Self {
        use std::io::Write;
        use std::sync::atomic::{AtomicBool, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.set_nonblocking(true).expect("nonblocking");
        let port = listener.local_addr().expect("addr").port();
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let flag = std::sync::Arc::clone(&stop);
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Polled (the listener is non-blocking, so the thread can see `stop`):
            // 6,000 × 10 ms, never longer than a minute.
            for _ in 0..6_000 {
                if flag.load(Ordering::Relaxed) {
                    break;
                }
                if let Ok((mut stream, _)) = listener.accept() {
                    if banner {
                        let _ = stream.write_all(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n");
                    }
                    held.push(stream);
                }
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
        });
        Self { port, stop }
    }
}

impl Drop for HungHost {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}
