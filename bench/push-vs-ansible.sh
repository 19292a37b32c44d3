#!/usr/bin/env bash
# Times `gangplank sidecar-bootstrap` against an Ansible playbook doing the same work (mkdir,
# three file copies with the same modes, `docker rm --force` and `docker run`) over the same
# SSH setup: N real sshd "VMs" on loopback from testkit::sshd (stand-in docker on their PATH).
#
# Also the floor: the same N hosts each doing one `ssh host true` (one handshake, one login,
# no multiplexing), all N at once.
#
# Usage: bench/push-vs-ansible.sh [N]        (default N=50)
# Env:   CARGO_TARGET_DIR (default target);
#        CONCURRENCY: gangplank's --concurrency and Ansible's forks (default: no flag, so
#          gangplank's own default, and 64 forks);
#        ANSIBLE=0 skips the Ansible half;
#        ANSIBLE_VENV (default $CARGO_TARGET_DIR/bench-venv; ansible-core from PyPI is
#          installed there if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-50}
CONCURRENCY=${CONCURRENCY:-}
FORKS=${CONCURRENCY:-64}
ANSIBLE=${ANSIBLE:-1}
TARGET=${CARGO_TARGET_DIR:-target}
VENV=${ANSIBLE_VENV:-$TARGET/bench-venv}

if [ "$ANSIBLE" != 0 ] && [ ! -x "$VENV/bin/ansible-playbook" ]; then
  echo "--- installing ansible-core into $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q ansible-core
fi
echo "--- building gangplank and the sshd fleet"
cargo build -q -p gangplank --bin gangplank
cargo build -q -p gangplank-push --example sshd_fleet
GANGPLANK="$TARGET/debug/gangplank"

WORK=$(mktemp -d /tmp/gangplank-bench.XXXXXX)
FIFO="$WORK/keepalive"
mkfifo "$FIFO"
"$TARGET/debug/examples/sshd_fleet" "$N" "$WORK" < "$FIFO" > "$WORK/fleet.out" 2>&1 &
FLEET_PID=$!
exec 3> "$FIFO"   # the fleet lives until fd 3 closes
cleanup() { exec 3>&-; wait "$FLEET_PID" 2>/dev/null || true; rm -rf "$WORK"; }
trap cleanup EXIT
until grep -q ready "$WORK/fleet.out" 2>/dev/null; do
  kill -0 "$FLEET_PID" 2>/dev/null || { cat "$WORK/fleet.out"; exit 1; }
  sleep 0.2
done
echo "--- $N VMs up"

now() { date +%s.%N; }

# --- the floor: one plain SSH login per host, all at once
tf0=$(now)
awk '/ansible_host=/ { split($2, h, "="); split($3, p, "="); print h[2], p[2] }' "$WORK/inventory.ini" |
  xargs -P "$N" -n 2 sh -c 'ssh -F "$0" -o ControlMaster=no -o ControlPath=none -p "$2" "root@$1" true' "$WORK/ssh_config"
tf1=$(now)

# --- gangplank
concurrency_flag=()
[ -n "$CONCURRENCY" ] && concurrency_flag=(--concurrency "$CONCURRENCY")
t0=$(now)
"$GANGPLANK" sidecar-bootstrap --all -f "$WORK/entries" --token "$WORK/token" \
  --root-cert "$WORK/root-cert.pem" --ssh-config "$WORK/ssh_config" \
  --start-istio-proxy --proxy-tag 1.27.1 "${concurrency_flag[@]}" -o json \
  > "$WORK/gangplank.json" 2> "$WORK/gangplank.log"
t1=$(now)
ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["succeeded"])' "$WORK/gangplank.json")
[ "$ok" = "$N" ] || { echo "gangplank: only $ok of $N hosts succeeded"; tail "$WORK/gangplank.log"; exit 1; }

if [ "$ANSIBLE" = 0 ]; then
  python3 - "$N" "${CONCURRENCY:-default}" "$tf0" "$tf1" "$t0" "$t1" <<'PY'
import sys
n, c, f0, f1, t0, t1 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
print(f"hosts: {n}, concurrency: {c}")
print(f"floor (N x ssh true, all at once): {f1 - f0:.2f}s")
print(f"gangplank sidecar-bootstrap:       {t1 - t0:.2f}s ({(t1 - t0) / (f1 - f0):.2f}x the floor)")
PY
  exit 0
fi

# --- ansible: same files (the sidecar.env of the first VM as a template), same commands
first=$(head -1 "$WORK/vms.txt")
cp "$first/etc/istio-proxy/sidecar.env" "$WORK/sidecar.env"
cat > "$WORK/playbook.yaml" <<YAML
- hosts: vms
  gather_facts: false
  tasks:
    - file: {path: "{{ config_dir }}", state: directory}
    - copy: {src: "$WORK/sidecar.env", dest: "{{ config_dir }}/sidecar.env", mode: "0644"}
    - copy: {src: "$WORK/root-cert.pem", dest: "{{ config_dir }}/istio-ca.pem", mode: "0644"}
    - copy: {src: "$WORK/token", dest: "{{ config_dir }}/istio-token", mode: "0600"}
    - command: docker rm --force istio-proxy
      ignore_errors: true
    - command: >-
        docker run -d --name istio-proxy --restart unless-stopped --network host
        -v {{ config_dir }}/istio-ca.pem:/var/run/secrets/istio/root-cert.pem
        -v {{ config_dir }}/istio-token:/var/run/secrets/tokens/istio-token
        --env-file {{ config_dir }}/sidecar.env docker.io/tetrate/proxyv2:1.27.1 proxy sidecar
YAML
cat > "$WORK/ansible.cfg" <<CFG
[defaults]
forks = $FORKS
host_key_checking = True
interpreter_python = /usr/bin/python3
stdout_callback = default
[ssh_connection]
ssh_args = -F $WORK/ssh_config -o ControlMaster=auto -o ControlPersist=60s
pipelining = True
CFG
t2=$(now)
ANSIBLE_CONFIG="$WORK/ansible.cfg" "$VENV/bin/ansible-playbook" -i "$WORK/inventory.ini" \
  -u root "$WORK/playbook.yaml" > "$WORK/ansible.log" 2>&1 || { tail -30 "$WORK/ansible.log"; exit 1; }
t3=$(now)
grep -q "failed=0" "$WORK/ansible.log" || { tail -30 "$WORK/ansible.log"; exit 1; }

python3 - "$N" "${CONCURRENCY:-default}" "$tf0" "$tf1" "$t0" "$t1" "$t2" "$t3" <<'PY'
import sys
n, c, f0, f1, t0, t1, t2, t3 = sys.argv[1], sys.argv[2], *map(float, sys.argv[3:])
g, a = t1 - t0, t3 - t2
print(f"hosts: {n}, concurrency: {c} (Ansible forks: {c if c != 'default' else 64})")
print(f"floor (N x ssh true, all at once): {f1 - f0:.2f}s")
print(f"gangplank sidecar-bootstrap: {g:.2f}s")
print(f"ansible-playbook:            {a:.2f}s")
print(f"ratio (ansible / gangplank): {a / g:.1f}x")
PY
