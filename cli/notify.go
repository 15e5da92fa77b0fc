package cli

import (
	"fmt"
	"log/slog"
	"time"

	sd "github.com/coreos/go-systemd/v22/daemon"

	"github.com/blockd/blockd/api"
)

// notifier tells systemd (Type=notify) how `blockd serve` is doing:
// STATUS= lines while it starts, READY=1 once every volume is loaded and
// every kernel device recovered (daemon.Start has returned), WATCHDOG=1
// while its API answers (WatchdogSec=, WATCHDOG_USEC), STOPPING=1 when it
// begins to shut down. Without $NOTIFY_SOCKET every call is a no-op.
type notifier struct {
	log  *slog.Logger
	stop chan struct{}
	done chan struct{}
}

func newNotifier(log *slog.Logger) *notifier {
	return &notifier{log: log}
}

func (n *notifier) send(state string) {
	if _, err := sd.SdNotify(false, state); err != nil {
		n.log.Warn("systemd notification failed", "state", state, "err", err)
	}
}

// status sends a STATUS= line.
func (n *notifier) status(format string, a ...any) { n.send("STATUS=" + fmt.Sprintf(format, a...)) }

// ready sends READY=1 with a status, and starts the watchdog pings when
// systemd asks for them: every half interval, a WATCHDOG=1 if the control
// API at socket answers (a daemon whose API hangs gets restarted).
func (n *notifier) ready(status, socket string) {
	n.send("READY=1\nSTATUS=" + status)
	every, err := sd.SdWatchdogEnabled(false)
	if err != nil {
		n.log.Warn("systemd watchdog settings unreadable; not pinging", "err", err)
		return
	}
	if every <= 0 {
		return
	}
	n.log.Info("systemd watchdog", "interval", every.String())
	n.stop, n.done = make(chan struct{}), make(chan struct{})
	client := api.NewClient(socket)
	go func() {
		defer close(n.done)
		t := time.NewTicker(every / 2)
		defer t.Stop()
		for {
			select {
			case <-n.stop:
				return
			case <-t.C:
			}
			if err := client.Health(); err != nil {
				n.log.Warn("control API does not answer; skipping the systemd watchdog ping", "err", err)
				continue
			}
			n.send("WATCHDOG=1")
		}
	}()
}

// stopping sends STOPPING=1 and ends the watchdog pings.
func (n *notifier) stopping(status string) {
	if n.stop != nil {
		close(n.stop)
		<-n.done
		n.stop = nil
	}
	n.send("STOPPING=1\nSTATUS=" + status)
}
