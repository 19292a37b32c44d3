# gangplank-agent %postun ($1: 0 = removal, 1 = upgrade). RPM has no purge: the VM's bound
# key and registration in /var/lib/gangplank stay; delete that folder to forget them.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
fi
