# package cluster and the multi-node tests: a real etcd (Debian's
# etcd-server, 3.4; the Go client v3.7 speaks its API) started by the
# tests in temp dirs, on loopback or in a network lab's namespace.
APT_PACKAGES += etcd-server etcd-client
