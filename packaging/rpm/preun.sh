# gangplank-agent %preun ($1: 0 = removal, 1 = upgrade). On removal: stop the agent,
# deregister this VM, disable the unit. An upgrade stops nothing (%post restarts).
if [ "$1" -eq 0 ]; then
	if [ -d /run/systemd/system ]; then
		systemctl stop gangplank-agent.service || :
	fi
	if [ -f /var/lib/gangplank/registration.json ]; then
		/usr/bin/gangplank-agent leave ||
			echo "gangplank-agent: could not deregister this VM now; the endpoint removes its WorkloadEntry after its grace period" >&2
	fi
	if command -v systemctl >/dev/null 2>&1; then
		systemctl disable gangplank-agent.service || :
	fi
fi
