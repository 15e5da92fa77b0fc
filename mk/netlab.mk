# e2e/netlab: multi-node network labs in namespaces (root). nftables loads
# the fault rules (partitions, loss, one-way drops) inside the lab's
# namespaces; iproute2 builds them. With CI=true a missing tool fails the
# tests instead of skipping them.
APT_PACKAGES += nftables iproute2
