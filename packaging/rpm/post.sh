# gangplank-agent %post ($1: 1 = install, 2 = upgrade). As the .deb's postinst: make the
# folders the sandboxed unit writes, enable the unit, start it only once
# /etc/gangplank/onboarding.yaml holds a configuration, restart a running agent on upgrade.
install -d -m 0755 /etc/certs /etc/istio /etc/istio/config /var/lib/istio /var/lib/istio/envoy /var/lib/gangplank
if command -v systemd-tmpfiles >/dev/null 2>&1; then
	systemd-tmpfiles --create /usr/lib/tmpfiles.d/gangplank-agent.conf || :
fi
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
fi
if [ "$1" -eq 1 ] && command -v systemctl >/dev/null 2>&1; then
	systemctl enable gangplank-agent.service || :
fi
if [ -d /run/systemd/system ] && [ -f /etc/gangplank/onboarding.yaml ] &&
	grep -q '^[[:space:]]*[^#[:space:]]' /etc/gangplank/onboarding.yaml; then
	if [ "$1" -eq 1 ]; then
		systemctl start gangplank-agent.service || :
	else
		systemctl try-restart gangplank-agent.service || :
	fi
fi
