//! Starts N stand-in VMs (real sshd on loopback, testkit::sshd) for the push benchmark and
//! writes, into OUT_DIR: `entries/` (one annotated WorkloadEntry per VM), `ssh_config`,
//! `inventory.ini` (the same hosts for Ansible), `token`, `root-cert.pem`, and `vms.txt`
//! (each VM's folder). Prints `ready` and keeps the VMs up until stdin closes.
//!
//! Usage: `cargo run -p gangplank-push --example sshd_fleet -- N OUT_DIR`

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, Result};
use gangplank_testkit::sshd::Fleet;

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().context("usage: sshd_fleet N OUT_DIR")?.parse()?;
    let out = PathBuf::from(args.next().context("usage: sshd_fleet N OUT_DIR")?);
    let fleet = Fleet::start(n)?;
    let entries = out.join("entries");
    std::fs::create_dir_all(&entries)?;
    let mut inventory = String::from("[vms]\n");
    let mut vms = String::new();
    for (i, vm) in fleet.vms.iter().enumerate() {
        let dir = vm.root.join("etc/istio-proxy");
        std::fs::write(
            entries.join(format!("vm-{i:03}.yaml")),
            format!(
                "apiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: vm-{i:03}\n  namespace: bench\n  annotations:\n    sidecar-bootstrap.istio.io/ssh-host: \"{addr}\"\n    sidecar-bootstrap.istio.io/ssh-port: \"{port}\"\n    sidecar-bootstrap.istio.io/ssh-user: root\n    sidecar-bootstrap.istio.io/proxy-config-dir: {dir}\n    sidecar-bootstrap.istio.io/proxy-image-hub: docker.io/tetrate\nspec:\n  address: 10.128.0.{last}\n  serviceAccount: bench\n  labels: {{app: bench}}\n",
                addr = vm.addr,
                port = vm.port,
                dir = dir.display(),
                last = i % 250 + 1,
            ),
        )?;
        inventory.push_str(&format!(
            "vm-{i:03} ansible_host={} ansible_port={} config_dir={}\n",
            vm.addr,
            vm.port,
            dir.display()
        ));
        vms.push_str(&format!("{}\n", vm.root.display()));
    }
    std::fs::write(out.join("inventory.ini"), inventory)?;
    std::fs::write(out.join("vms.txt"), vms)?;
    std::fs::copy(fleet.ssh_config(), out.join("ssh_config"))?;
    std::fs::write(out.join("token"), "eyJhbGciOiJSUzI1NiJ9.YmVuY2g.sig\n")?;
    std::fs::write(
        out.join("root-cert.pem"),
        "-----BEGIN CERTIFICATE-----\nMIIBbench\n-----END CERTIFICATE-----\n",
    )?;
    println!("ready");
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(fleet);
    Ok(())
}
