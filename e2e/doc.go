// Package e2e holds the end-to-end tests of the blockd binary: the test
// binary doubles as blockd (TestMain), so each test runs real daemon
// processes on temporary state dirs and drives them with real NBD clients
// (qemu-io, fio, nbdsh) and real failures (kill -9, SIGTERM).
package e2e
