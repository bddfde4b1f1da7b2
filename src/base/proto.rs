//! The seed registry's gRPC messages, server and client, generated from
//! `proto/registry.proto` at build time (build.rs, in pure Rust: no `protoc` needed).
// Generated code: its own style, its own docs.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("codesprintpro.scalability.registry.v1");
