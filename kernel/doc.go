// Package kernel groups the small packages that talk to the Linux kernel's
// block-device plumbing: module loading (kernel/module) and the NBD generic
// netlink client (kernel/nbdnl). It holds no code itself.
package kernel
