package transport

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/quic-go/quic-go"
)

// The kinds of Call failure: an *Error's Kind is one of them, and
// errors.Is sees both the kind and the cause (a context error, a quic-go
// error such as *quic.StatelessResetError).
var (
	// ErrClosed: this transport was closed (before or during the call).
	ErrClosed = errors.New("transport closed")
	// ErrUnknownPeer: the peer is not in Config.Peers.
	ErrUnknownPeer = errors.New("unknown peer")
	// ErrUnreachable: no connection could be made (no answer within the
	// dial timeout or the caller's deadline, an address that does not
	// resolve).
	ErrUnreachable = errors.New("peer unreachable")
	// ErrRefused: the TLS handshake failed (wrong CA, wrong name, no
	// client certificate, another protocol); nothing was delivered.
	ErrRefused = errors.New("refused by TLS")
	// ErrTimeout: the caller's context ended while the call was under way
	// on a connection; the request may or may not have been delivered.
	ErrTimeout = errors.New("timed out")
	// ErrConnLost: the connection or stream died under the call (the peer
	// closed it, restarted, or went silent for the idle timeout); the
	// request may or may not have been delivered.
	ErrConnLost = errors.New("connection lost")
	// ErrProtocol: the peer sent a malformed or oversized frame.
	ErrProtocol = errors.New("protocol error")
	// ErrTooLarge: the request's payload is above Config.MaxPayload.
	ErrTooLarge = errors.New("payload too large")
)

// Error is a failed Call.
type Error struct {
	Peer string // the peer called
	Kind error  // ErrUnreachable, ErrRefused, ErrTimeout, ...
	Err  error  // the cause
}

func (e *Error) Error() string {
	if e.Err == nil || e.Err == e.Kind {
		return fmt.Sprintf("transport: call %s: %v", e.Peer, e.Kind)
	}
	return fmt.Sprintf("transport: call %s: %v: %v", e.Peer, e.Kind, e.Err)
}

func (e *Error) Unwrap() []error { return []error{e.Kind, e.Err} }

// StatusError is a response whose Status is not StatusOK: the peer handled
// the request and answered with a code. Call still fills the response
// Header and returns the response payload alongside it.
type StatusError struct {
	Peer   string
	Type   uint8  // the response's Type
	Status uint16 // the response's Status
}

func (e *StatusError) Error() string {
	return fmt.Sprintf("transport: call %s: message type %d: status %d", e.Peer, e.Type, e.Status)
}

// Application error codes: on connections (CONNECTION_CLOSE) and on streams
// (RESET_STREAM, STOP_SENDING).
const (
	codeShutdown = 1 // the node is closing its transport
	codeProtocol = 2 // a malformed frame
	codeCanceled = 3 // the caller gave up on a call
)

// errNotSent marks a failure that happened before any byte of the request
// left: Call may try again on a fresh stream or connection.
var errNotSent = errors.New("request not sent")

func notSent(err error) error {
	if errors.Is(err, errNotSent) {
		return err
	}
	return fmt.Errorf("%w: %w", errNotSent, err)
}

// callError wraps err, the failure of a call to peer, into an *Error of the
// right kind. A *StatusError is returned as it is.
func callError(peer string, err error, closed bool) error {
	var se *StatusError
	if errors.As(err, &se) {
		return err
	}
	var e *Error
	if errors.As(err, &e) {
		return err
	}
	return &Error{Peer: peer, Kind: kindOf(err, closed), Err: err}
}

func kindOf(err error, closed bool) error {
	var (
		te *quic.TransportError
		ae *quic.ApplicationError
		se *quic.StreamError
		ht *quic.HandshakeTimeoutError
		ne *net.OpError
		de *net.DNSError
	)
	switch {
	case closed || errors.Is(err, ErrClosed):
		return ErrClosed
	case errors.Is(err, context.DeadlineExceeded) || errors.Is(err, context.Canceled):
		return ErrTimeout
	case errors.As(err, &te):
		if te.ErrorCode.IsCryptoError() || te.ErrorCode == quic.ConnectionRefused {
			return ErrRefused
		}
		return ErrConnLost
	case errors.As(err, &ae):
		if ae.ErrorCode == codeProtocol {
			return ErrProtocol
		}
		return ErrConnLost
	case errors.As(err, &se):
		if se.ErrorCode == codeProtocol {
			return ErrProtocol
		}
		return ErrConnLost
	case errors.As(err, &ht), errors.As(err, &ne), errors.As(err, &de):
		return ErrUnreachable
	case errors.Is(err, errFrame) || errors.Is(err, errTooLarge):
		return ErrProtocol
	}
	return ErrConnLost
}
