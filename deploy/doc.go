// Package deploy holds blockd's deployment files and the tests that check
// them without a cluster or a running systemd: the Kubernetes manifests
// (kubernetes/, decoded strictly into the k8s.io/api types and checked
// against each other), the systemd unit (systemd/, verified by
// systemd-analyze), and the container image builder (image/).
package deploy
