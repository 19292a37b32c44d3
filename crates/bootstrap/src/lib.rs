//! The one renderer of the Istio sidecar's boot files (cluster.env, mesh.yaml, root-cert.pem, istio-token, hosts).
