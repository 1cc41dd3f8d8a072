package node

import (
	"context"
	"net"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	grpchealth "google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// TestStopGRPCEndsStuckCalls: a call that never returns (a watch here, a
// push parked in a failed store in production) holds GracefulStop forever;
// stopGRPC ends it once the timeout passes.
func TestStopGRPCEndsStuckCalls(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, grpchealth.NewServer())
	go s.Serve(ln)

	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	watch, err := healthpb.NewHealthClient(conn).Watch(context.Background(), &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := watch.Recv(); err != nil {
		t.Fatal(err)
	}

	stopped := make(chan struct{})
	go func() {
		stopGRPC(s, 100*time.Millisecond)
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(30 * time.Second):
		t.Fatal("stopGRPC still waits for a call that never ends")
	}
	if _, err := watch.Recv(); err == nil {
		t.Error("the stuck call goes on after the stop")
	}
}
