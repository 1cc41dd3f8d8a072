// Package wirepb holds the generated protobuf and gRPC code of dimsum's wire
// contract, dimsum.proto. Regenerate it with `go generate ./wire/...` after
// installing protoc (Debian's protobuf-compiler) and the two Go plugins:
//
//	go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
//	go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.0
package wirepb

//go:generate protoc --go_out=. --go_opt=paths=source_relative --go-grpc_out=. --go-grpc_opt=paths=source_relative dimsum.proto read.proto
