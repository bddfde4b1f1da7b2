//! One set of backend rules, whichever way a backend arrives: the config file, the admin API
//! (`POST`, `PUT`) and the registry's `ReportActive` refuse the same mistakes, each in its own
//! form (a located diagnostic, a `400`/`409` with a JSON error, a gRPC status), and a refused
//! change leaves the pool as it was.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::SocketAddr;
use std::path::Path;

use fulcrum::config::Config;
use http::Method;
use serde_json::{Value, json};
use support::admin_api::api;
use support::registry::*;
use support::*;
use tonic::Code;

/// The diagnostics of a one-pool file whose only backend is `backend` (TOML inline table).
fn file_errors(backend: &str) -> String {
    let text =
        format!("[[listeners]]\nbind = \"127.0.0.1:0\"\n[pools.p]\nbackends = [{backend}]\n");
    match Config::parse(Path::new("rules.toml"), &text) {
        Ok(_) => panic!("accepted: {backend}"),
        Err(e) => e.to_string(),
    }
}

/// What `POST /api/pools/POOL/backends` answered for `spec`: the status and the error.
async fn api_refusal(running: &fulcrum::Running, pool: &str, spec: Value) -> (u16, String) {
    let path = format!("/api/pools/{pool}/backends");
    let (status, body) = api(running, Method::POST, &path, Some(spec.clone()), None).await;
    let error = body["error"]
        .as_str()
        .unwrap_or_else(|| panic!("{spec}: no JSON error in {body}"))
        .to_owned();
    (status.as_u16(), error)
}

fn names(listed: &[(String, String, String)]) -> Vec<&str> {
    listed.iter().map(|(name, _, _)| name.as_str()).collect()
}

#[tokio::test]
async fn a_name_with_a_control_character_or_over_255_bytes_is_refused_by_the_file_the_api_and_the_registry()
 {
    let nodes = webnodes(1).await;
    let pool = "rules_names";
    let running = balancer(&registry_config(pool, &nodes_as_backends(&nodes), "5s", "")).await;
    let mut registry = registry_client(&running).await;
    let before = listed(&running, pool).await;
    let free: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let long = "n".repeat(256);

    for bad in ["tab\there", "line\nbreak", long.as_str()] {
        // `{:?}` writes `\t` and `\n` as TOML's own escapes.
        let errors = file_errors(&format!("{{ address = \"{free}\", name = {bad:?} }}"));
        assert!(
            errors.contains(
                "pools.p.backends[0].name: must be at most 255 bytes without control characters"
            ),
            "{bad:?}: {errors}"
        );

        let spec = json!({"address": free.to_string(), "name": bad});
        let (status, error) = api_refusal(&running, pool, spec).await;
        assert_eq!(status, 400, "{bad:?}: {error}");
        assert!(error.starts_with("name: "), "{bad:?}: {error}");

        let refused = registry
            .report_active(active(bad, free))
            .await
            .expect_err("a bad server_id is refused");
        assert_eq!(
            refused.code(),
            Code::InvalidArgument,
            "{bad:?}: {refused:?}"
        );
    }
    assert_eq!(listed(&running, pool).await, before, "nothing changed");

    // The longest name there may be is fine everywhere.
    let longest = "n".repeat(255);
    let spec = json!({"address": free.to_string(), "name": longest});
    let (status, body) = api(
        &running,
        Method::POST,
        &format!("/api/pools/{pool}/backends"),
        Some(spec),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert!(names(&listed(&running, pool).await).contains(&longest.as_str()));
}

#[tokio::test]
async fn the_file_and_the_api_refuse_the_same_address_weight_cap_and_duplicate_mistakes() {
    let nodes = webnodes(1).await;
    let pool = "rules_fields";
    let taken = nodes[0].local_addr();
    let running = balancer(&single_pool(
        pool,
        "round_robin",
        &nodes_as_backends(&nodes),
        "",
    ))
    .await;
    let before = listed(&running, pool).await;
    let taken_name = nodes[0].id().to_owned();

    // (the backend in the file, after a first one the pool already holds; the same in the
    // API; the file's diagnostic; the API's status and the start of its error)
    let first = format!("{{ address = \"{taken}\", name = \"{taken_name}\" }}");
    let cases = [
        (
            "{ address = \"127.0.0.1:0\" }".to_owned(),
            json!({"address": "127.0.0.1:0"}),
            "backends[1].address: port 0 is not a backend port",
            (400, "address: port 0 is not a backend port"),
        ),
        (
            "{ address = \"nope\" }".to_owned(),
            json!({"address": "nope"}),
            "backends[1].address: `nope` is not an IP:port address",
            (400, "address: `nope` is not an IP:port address"),
        ),
        (
            "{ address = \"127.0.0.1:9\", weight = 257 }".to_owned(),
            json!({"address": "127.0.0.1:9", "weight": 257}),
            "backends[1].weight: must be between 1 and 256 (got 257)",
            (400, "weight: must be between 1 and 256 (got 257)"),
        ),
        (
            "{ address = \"127.0.0.1:9\", max_connections = 0 }".to_owned(),
            json!({"address": "127.0.0.1:9", "max_connections": 0}),
            "backends[1].max_connections: must be between 1 and 1000000 (got 0)",
            (
                400,
                "max_connections: must be between 1 and 1000000 (got 0)",
            ),
        ),
        (
            "{ address = \"127.0.0.1:9\", name = \"\" }".to_owned(),
            json!({"address": "127.0.0.1:9", "name": ""}),
            "backends[1].name: must not be empty",
            (400, "name: must not be empty"),
        ),
        (
            format!("{{ address = \"127.0.0.1:9\", name = \"{taken_name}\" }}"),
            json!({"address": "127.0.0.1:9", "name": taken_name}),
            "backends[1].name: duplicate backend",
            (409, "a backend named"),
        ),
        (
            format!("{{ address = \"{taken}\", name = \"other\" }}"),
            json!({"address": taken.to_string(), "name": "other"}),
            "backends[1].address: duplicate backend address",
            (409, "a backend at"),
        ),
    ];
    for (in_file, spec, diagnostic, (status, error)) in cases {
        let errors = file_errors(&format!("{first}, {in_file}"));
        assert!(errors.contains(diagnostic), "{in_file}: {errors}");
        let (got_status, got_error) = api_refusal(&running, pool, spec.clone()).await;
        assert_eq!(got_status, status, "{spec}: {got_error}");
        assert!(got_error.starts_with(error), "{spec}: {got_error}");
    }
    // A PUT list is held to the same rules, its duplicates among themselves too.
    let path = format!("/api/pools/{pool}/backends");
    let twice =
        json!([{"address": "127.0.0.1:9", "name": "a"}, {"address": "127.0.0.1:10", "name": "a"}]);
    let (status, body) = api(&running, Method::PUT, &path, Some(twice), None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(listed(&running, pool).await, before, "nothing changed");
}
