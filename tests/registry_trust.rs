//! The registry as a trust boundary, over real gRPC on loopback: a caller without the token or
//! without a certificate from `client_ca` changes nothing; fulcrum's own sockets and addresses
//! outside `allowed_networks` are refused (the admin API refuses fulcrum's own sockets too);
//! `max_nodes` caps the pool; a node that moves is pending until it passes `rise` checks at its
//! new address; `check`, `run` and `start` refuse a registry open to the network without auth;
//! and `fulcrum webnode --register` brings its token (flag or environment) and its certificate.
#![allow(clippy::unwrap_used, clippy::expect_used, unreachable_pub)] // a test's unwrap is its assertion; its helpers are its own

mod support;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fulcrum::config::Config;
use fulcrum::registry::proto::server_registry_service_client::ServerRegistryServiceClient;
use fulcrum::webnode::{self, WebNodeOptions};
use http::Request;
use serde_json::json;
use support::registry::*;
use support::*;
use tonic::Code;
use tonic::metadata::MetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};

const TOKEN: &str = "s3cret-registry-token";

/// A gRPC request carrying `authorization: Bearer {token}`.
fn with_token<T>(message: T, token: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    request
}

fn refused_count(metrics: &str) -> f64 {
    series(metrics, "fulcrum_registry_events_total{event=\"refused\"}").unwrap_or(0.0)
}

#[tokio::test]
async fn fulcrums_own_listener_admin_and_registry_addresses_are_refused_and_change_nothing() {
    let nodes = webnodes(1).await;
    let pool = "trust_own";
    let running = balancer(&registry_config(
        pool,
        &[("web-1", nodes[0].local_addr(), 1)],
        "5s",
        "",
    ))
    .await;
    let mut registry = registry_client(&running).await;
    let before = listed(&running, pool).await;
    let own = [
        ("listener", running.addr("http").unwrap()),
        ("admin", running.admin_addr().unwrap()),
        ("registry", running.registry_addr().unwrap()),
    ];
    for (what, addr) in own {
        let err = registry
            .report_active(active("squatter", addr))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what} {addr}: {err:?}");
        assert!(
            err.message().contains("fulcrum's own"),
            "{what}: {}",
            err.message()
        );
        // The same socket written as an IPv4-mapped IPv6 address is the same socket.
        let mut mapped = active("squatter", addr);
        mapped.ip_address = format!("::ffff:{}", addr.ip());
        let err = registry.report_active(mapped).await.unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{what} mapped: {err:?}");
    }
    assert_eq!(listed(&running, pool).await, before, "nothing was added");

    // The admin API refuses them as well: a mistake, never a backend.
    let admin = running.admin_addr().unwrap();
    let backends = format!("http://{admin}/api/pools/{pool}/backends");
    for (what, addr) in own {
        let post = send(
            &client(),
            Request::post(&backends)
                .header("content-type", "application/json")
                .body(full(json!({"address": addr.to_string()}).to_string()))
                .unwrap(),
        )
        .await;
        assert_eq!(post.status, 400, "POST {what}: {}", post.text());
        assert!(post.text().contains("fulcrum's own"), "{}", post.text());
        let put = send(
            &client(),
            Request::put(&backends)
                .header("content-type", "application/json")
                .body(full(
                    json!([
                        {"address": nodes[0].local_addr().to_string(), "name": "web-1"},
                        {"address": addr.to_string(), "name": "loop"},
                    ])
                    .to_string(),
                ))
                .unwrap(),
        )
        .await;
        assert_eq!(put.status, 400, "PUT {what}: {}", put.text());
    }
    assert_eq!(listed(&running, pool).await, before, "nothing was changed");
    let metrics = scrape(&running).await;
    assert!(refused_count(&metrics) >= 6.0, "{metrics}");
}

#[tokio::test]
async fn a_wildcard_listener_is_reached_through_every_local_address() {
    let pool = "trust_wildcard";
    // Every network allowed: a refusal here can only be the own-socket rule.
    let text = registry_config(
        pool,
        &[],
        "5s",
        "allowed_networks = [\"0.0.0.0/0\", \"::/0\"]",
    )
    .replacen(
        "name = \"http\"\nbind = \"127.0.0.1:0\"",
        "name = \"http\"\nbind = \"0.0.0.0:0\"",
        1,
    );
    let running = balancer(&text).await;
    let port = running.addr("http").unwrap().port();
    let mut registry = registry_client(&running).await;
    let mut local: Vec<IpAddr> = vec!["127.0.0.1".parse().unwrap(), "127.0.0.2".parse().unwrap()];
    // The machine's own interface addresses, whatever they are here (refused, so never
    // contacted).
    local.extend(
        if_addrs::get_if_addrs()
            .unwrap()
            .iter()
            .map(|i| i.ip())
            .filter(|ip| !ip.is_unspecified()),
    );
    for ip in local {
        let err = registry
            .report_active(active("squatter", SocketAddr::new(ip, port)))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{ip}: {err:?}");
        assert!(err.message().contains("fulcrum's own"), "{ip}: {err:?}");
    }
    assert!(listed(&running, pool).await.is_empty());
    // Another port on loopback is somebody else's socket.
    let nodes = webnodes(1).await;
    registry
        .report_active(active("web-1", nodes[0].local_addr()))
        .await
        .expect("a loopback node at another port registers");
}

#[tokio::test]
async fn addresses_outside_allowed_networks_are_refused() {
    let pool = "trust_networks";
    // What the README recommends: loopback and the private ranges.
    let private = "allowed_networks = [\"127.0.0.0/8\", \"::1/128\", \"10.0.0.0/8\", \"172.16.0.0/12\", \"192.168.0.0/16\", \"fc00::/7\"]";
    let running = balancer(&registry_config(pool, &[], "5s", private)).await;
    let mut registry = registry_client(&running).await;
    // Public, link-local (the cloud metadata service), documentation: none is in those.
    for ip in ["8.8.8.8", "169.254.169.254", "fe80::1", "2001:db8::1"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
        let err = registry
            .report_active(active("outsider", addr))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::PermissionDenied, "{ip}: {err:?}");
        assert!(
            err.message().contains("allowed_networks"),
            "{}",
            err.message()
        );
    }
    // Unspecified and multicast are not addresses at all.
    for ip in ["0.0.0.0", "::", "224.0.0.1", "ff02::1"] {
        let addr = SocketAddr::new(ip.parse().unwrap(), 8080);
        let err = registry
            .report_active(active("nowhere", addr))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{ip}: {err:?}");
    }
    assert!(listed(&running, pool).await.is_empty());

    // Loopback is refused too when it is not listed.
    let nodes = webnodes(1).await;
    let pool = "trust_networks_listed";
    let running = balancer(&registry_config(
        pool,
        &[],
        "5s",
        "allowed_networks = [\"10.0.0.0/8\"]",
    ))
    .await;
    let mut registry = registry_client(&running).await;
    let err = registry
        .report_active(active("web-1", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied, "{err:?}");
    assert!(listed(&running, pool).await.is_empty());
    assert!(refused_count(&scrape(&running).await) >= 1.0);
}

#[tokio::test]
async fn with_a_token_a_call_without_it_or_with_a_wrong_one_is_unauthenticated() {
    let nodes = webnodes(2).await;
    let pool = "trust_token";
    let running = balancer(&registry_config(
        pool,
        &[],
        "5s",
        &format!("token = \"{TOKEN}\""),
    ))
    .await;
    let mut registry = registry_client(&running).await;

    let err = registry
        .report_active(active("reg-a", nodes[0].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "no metadata: {err:?}");
    for wrong in ["nope", &TOKEN[..TOKEN.len() - 1], &format!("{TOKEN}x")] {
        let err = registry
            .report_active(with_token(active("reg-a", nodes[0].local_addr()), wrong))
            .await
            .unwrap_err();
        assert_eq!(err.code(), Code::Unauthenticated, "{wrong:?}: {err:?}");
    }
    let mut basic = tonic::Request::new(active("reg-a", nodes[0].local_addr()));
    basic.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Basic {TOKEN}")).unwrap(),
    );
    let err = registry.report_active(basic).await.unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated, "another scheme: {err:?}");
    assert!(listed(&running, pool).await.is_empty(), "nothing was added");

    let reply = registry
        .report_active(with_token(active("reg-a", nodes[0].local_addr()), TOKEN))
        .await
        .expect("the right token registers")
        .into_inner();
    assert!(reply.is_registered);
    assert_eq!(
        state_of(&running, pool, "reg-a").await.as_deref(),
        Some("pending")
    );

    // Moving or decommissioning a node needs the token just the same.
    let err = registry
        .report_active(active("reg-a", nodes[1].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = registry
        .report_decommission(decommission("reg-a", "0"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    let err = registry
        .report_decommission(with_token(decommission("reg-a", "0"), "nope"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::Unauthenticated);
    assert_eq!(
        listed(&running, pool).await,
        [(
            "reg-a".to_owned(),
            nodes[0].local_addr().to_string(),
            "pending".to_owned()
        )],
        "still there, at its address"
    );
    registry
        .report_decommission(with_token(decommission("reg-a", "0"), TOKEN))
        .await
        .expect("the right token decommissions");
    assert!(listed(&running, pool).await.is_empty());
    assert!(refused_count(&scrape(&running).await) >= 8.0);
}

#[tokio::test]
async fn registering_beyond_max_nodes_is_resource_exhausted() {
    let nodes = webnodes(3).await;
    let pool = "trust_max";
    let running = balancer(&registry_config(pool, &[], "5s", "max_nodes = 2")).await;
    let mut registry = registry_client(&running).await;
    for (i, node) in nodes[..2].iter().enumerate() {
        registry
            .report_active(active(&format!("reg-{i}"), node.local_addr()))
            .await
            .expect("within max_nodes");
    }
    let err = registry
        .report_active(active("reg-2", nodes[2].local_addr()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("max_nodes"), "{}", err.message());
    assert_eq!(listed(&running, pool).await.len(), 2);
    // Heartbeats of the nodes already in stay fine.
    registry
        .report_active(active("reg-0", nodes[0].local_addr()))
        .await
        .expect("a heartbeat at the cap");
    // A node that leaves makes room.
    registry
        .report_decommission(decommission("reg-1", "0"))
        .await
        .unwrap();
    registry
        .report_active(active("reg-2", nodes[2].local_addr()))
        .await
        .expect("room again");
}

#[tokio::test]
async fn a_node_that_moves_is_pending_until_rise_passes_at_its_new_address() {
    let nodes = webnodes(1).await;
    let pool = "trust_moved";
    let running = balancer(&registry_config(pool, &[], "5s", "")).await;
    let mut registry = registry_client(&running).await;
    registry
        .report_active(active("reg-m", nodes[0].local_addr()))
        .await
        .unwrap();
    wait_until("the node is up at its first address", || async {
        state_of(&running, pool, "reg-m").await.as_deref() == Some("up")
    })
    .await;

    // It moves to an address nobody listens on yet: pending at once, and it stays so however
    // long its old address keeps passing checks.
    let new_addr = free_port().await;
    let reply = registry
        .report_active(active("reg-m", new_addr))
        .await
        .expect("a move is accepted")
        .into_inner();
    assert!(reply.is_registered);
    assert_eq!(
        listed(&running, pool).await,
        [(
            "reg-m".to_owned(),
            new_addr.to_string(),
            "pending".to_owned()
        )],
        "pending at the new address the moment the move is answered"
    );
    let silent_until = Instant::now() + Duration::from_millis(800);
    while Instant::now() < silent_until {
        assert_eq!(
            state_of(&running, pool, "reg-m").await.as_deref(),
            Some("pending"),
            "routable before any check passed at the new address"
        );
        let reply = get(&client(), &url(&running, "/")).await;
        assert_eq!(reply.status, 503, "no routable node: {}", reply.text());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Something starts answering there: up after `rise` passes, and traffic goes there.
    let moved = webnode::spawn(WebNodeOptions::new(new_addr, "web-moved"))
        .await
        .expect("a web node at the new address");
    let answering = Instant::now();
    wait_until("the moved node rises at its new address", || async {
        state_of(&running, pool, "reg-m").await.as_deref() == Some("up")
    })
    .await;
    // rise = 2 at 100 ms: at least one interval between the first pass and the second.
    assert!(
        answering.elapsed() >= Duration::from_millis(100),
        "up after {:?}",
        answering.elapsed()
    );
    assert_eq!(
        get(&client(), &url(&running, "/")).await.served_by(),
        moved.id()
    );
}

/// CA-signed certificates for mutual TLS, written as PEM files in a directory of the test's
/// own: the registry's server certificate for `localhost` and client certificates.
struct Pki {
    dir: tls::CertDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl Pki {
    fn new(test: &str, name: &str) -> Self {
        let dir = tls::CertDir::new(test);
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        dir.file(&format!("{name}.crt"), ca.pem().as_bytes());
        Self { dir, ca }
    }

    fn ca_path(&self, name: &str) -> PathBuf {
        self.dir.path.join(format!("{name}.crt"))
    }

    /// A certificate signed by this CA; returns (cert, key) paths.
    fn issue(
        &self,
        stem: &str,
        names: &[&str],
        usage: rcgen::ExtendedKeyUsagePurpose,
    ) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, stem);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        (
            self.dir.file(&format!("{stem}.crt"), cert.pem().as_bytes()),
            self.dir
                .file(&format!("{stem}.key"), key.serialize_pem().as_bytes()),
        )
    }
}

/// A gRPC client of a TLS registry that trusts `ca` and presents `identity` when given.
async fn tls_client(
    registry: SocketAddr,
    ca: &Path,
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<ServerRegistryServiceClient<Channel>, tonic::transport::Error> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(std::fs::read(ca).unwrap()));
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    let channel = Channel::from_shared(format!("https://{registry}"))
        .unwrap()
        .tls_config(tls)?
        .connect_timeout(DEADLINE)
        .timeout(DEADLINE)
        .connect()
        .await?;
    Ok(ServerRegistryServiceClient::new(channel))
}

/// `[registry.tls]` with this PKI's server certificate and `client_ca`.
fn mtls_table(server: &(PathBuf, PathBuf), client_ca: &Path) -> String {
    format!(
        "[registry.tls]\ncert = \"{}\"\nkey = \"{}\"\nclient_ca = \"{}\"\n",
        server.0.display(),
        server.1.display(),
        client_ca.display()
    )
}

#[tokio::test]
async fn with_client_ca_only_a_client_certificate_from_that_ca_gets_in() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let pki = Pki::new("registry-mtls", "fleet-ca");
    let rogue = Pki::new("registry-mtls-rogue", "rogue-ca");
    let server = pki.issue("registry", &["127.0.0.1"], ServerAuth);
    let node_identity = pki.issue("node", &["node.fleet"], ClientAuth);
    let rogue_identity = rogue.issue("impostor", &["node.fleet"], ClientAuth);
    let nodes = webnodes(1).await;
    let pool = "trust_mtls";
    let text =
        registry_config(pool, &[], "5s", "") + &mtls_table(&server, &pki.ca_path("fleet-ca"));
    let running = balancer(&text).await;
    let addr = running.registry_addr().unwrap();
    let ca = pki.ca_path("fleet-ca");

    // No certificate, or one from another CA: the handshake fails, no call gets through.
    for (who, identity) in [
        ("no certificate", None),
        ("another CA", Some(&rogue_identity)),
    ] {
        let outcome = match tls_client(addr, &ca, identity).await {
            Ok(mut client) => client
                .report_active(active("reg-t", nodes[0].local_addr()))
                .await
                .map(|_| ())
                .map_err(|status| status.to_string()),
            Err(e) => Err(e.to_string()),
        };
        assert!(outcome.is_err(), "{who}: the call went through");
    }
    // Cleartext HTTP/2 to a TLS registry is not gRPC it understands.
    let plain = ServerRegistryServiceClient::connect(format!("http://{addr}")).await;
    if let Ok(mut plain) = plain {
        assert!(
            plain
                .report_active(active("reg-t", nodes[0].local_addr()))
                .await
                .is_err()
        );
    }
    assert!(listed(&running, pool).await.is_empty(), "nothing was added");

    let mut client = tls_client(addr, &ca, Some(&node_identity))
        .await
        .expect("a certificate from client_ca connects");
    client
        .report_active(active("reg-t", nodes[0].local_addr()))
        .await
        .expect("and registers");
    assert_eq!(
        state_of(&running, pool, "reg-t").await.as_deref(),
        Some("pending")
    );
}

/// A config file of its own, removed when the test ends.
struct ConfigFile(PathBuf);

impl ConfigFile {
    fn new(name: &str, text: &str) -> Self {
        let path = std::env::temp_dir().join(format!(
            "fulcrum-registry-trust-{name}-{}.toml",
            std::process::id()
        ));
        std::fs::write(&path, text).unwrap();
        Self(path)
    }
}

impl Drop for ConfigFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

#[tokio::test]
async fn check_run_and_start_refuse_a_registry_open_to_the_network_without_auth() {
    let open = registry_config("trust_open", &[], "5s", "").replacen(
        "bind = \"127.0.0.1:0\"\npool",
        "bind = \"0.0.0.0:0\"\npool",
        1,
    );
    let file = ConfigFile::new("open", &open);
    let check = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&file.0)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&check.stderr);
    assert_eq!(check.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("registry.bind: a non-loopback registry bind needs registry.token"),
        "{stderr}"
    );
    match fulcrum::start_file(&file.0).await {
        Err(fulcrum::StartError::Config(e)) => {
            assert!(e.to_string().contains("registry.token"), "{e}")
        }
        other => panic!("`run` started an open registry: {other:?}"),
    }
    // `run` from the command line says so and exits 1.
    let run = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["run", "-c"])
        .arg(&file.0)
        .stdout(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(run.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&run.stderr).contains("registry.token"));

    // [registry.tls] without client_ca encrypts, but lets anyone in: still refused.
    let certs = tls::CertDir::new("registry-open-tls");
    let cert = certs.cert("registry", &["localhost"]);
    let tls_only = format!(
        "{open}[registry.tls]\ncert = \"{}\"\nkey = \"{}\"\n",
        cert.cert.display(),
        cert.key.display()
    );
    let err = Config::parse(Path::new("test.toml"), &tls_only)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("registry.token") && err.contains("client_ca"),
        "{err}"
    );

    // A Config built in code is held to the same rule by `start`.
    let with_token = open.replace(
        "heartbeat_interval = \"5s\"",
        &format!("heartbeat_interval = \"5s\"\ntoken = \"{TOKEN}\""),
    );
    let mut config = Config::parse(Path::new("test.toml"), &with_token).unwrap();
    config.registry.as_mut().unwrap().token = None;
    match fulcrum::start(&config).await {
        Err(fulcrum::StartError::Config(e)) => {
            assert!(e.to_string().contains("registry.token"), "{e}")
        }
        other => panic!("start served an open registry: {other:?}"),
    }

    // With a token, the same bind is fine everywhere.
    let file = ConfigFile::new("token", &with_token);
    let check = Command::new(env!("CARGO_BIN_EXE_fulcrum"))
        .args(["check", "-c"])
        .arg(&file.0)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert_eq!(
        check.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(stdout.contains("token set"), "{stdout}");
    assert!(
        !stdout.contains(TOKEN),
        "the summary shows the token: {stdout}"
    );
    let running = fulcrum::start_file(&file.0)
        .await
        .expect("a registry with a token may listen on every address");
    assert!(running.registry_addr().unwrap().ip().is_unspecified());
    assert!(
        !format!("{:?}", running.control()).contains(TOKEN),
        "Debug output carries the token"
    );
    running.shutdown().await;
}

/// Starts `fulcrum webnode --register URL` with `extra` arguments and environment.
fn registering_node(
    id: &str,
    listen: SocketAddr,
    url: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> Process {
    let mut command = Command::new(env!("CARGO_BIN_EXE_fulcrum"));
    command
        .args(["webnode", "--listen", &listen.to_string(), "--id", id])
        .args(["--register", url])
        .args(extra)
        .env_remove("FULCRUM_REGISTRY_TOKEN")
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Process(command.spawn().expect("start the web node binary"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webnode_brings_its_token_by_flag_or_environment_and_without_it_stays_out() {
    let pool = "trust_webnode";
    let running = balancer(&registry_config(
        pool,
        &[],
        "1s",
        &format!("token = \"{TOKEN}\""),
    ))
    .await;
    let url = format!("http://{}", running.registry_addr().unwrap());
    let (flag, env, none) = (free_port().await, free_port().await, free_port().await);
    let _by_flag = registering_node("by-flag", flag, &url, &["--registry-token", TOKEN], &[]);
    let _by_env = registering_node(
        "by-env",
        env,
        &url,
        &[],
        &[("FULCRUM_REGISTRY_TOKEN", TOKEN)],
    );
    let _without = registering_node("without", none, &url, &[], &[]);
    wait_until("both nodes with the token are up", || async {
        state_of(&running, pool, "by-flag").await.as_deref() == Some("up")
            && state_of(&running, pool, "by-env").await.as_deref() == Some("up")
    })
    .await;
    wait_until("the node without a token was refused", || async {
        refused_count(&scrape(&running).await) >= 1.0
    })
    .await;
    // The two nodes register concurrently: their order in the pool is not the point.
    let mut names: Vec<String> = listed(&running, pool)
        .await
        .into_iter()
        .map(|(name, _, _)| name)
        .collect();
    names.sort();
    assert_eq!(
        names,
        ["by-env", "by-flag"],
        "the node without a token is not in"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webnode_registers_over_mutual_tls_with_its_certificate() {
    use rcgen::ExtendedKeyUsagePurpose::{ClientAuth, ServerAuth};
    let pki = Pki::new("registry-webnode-mtls", "fleet-ca");
    let server = pki.issue("registry", &["127.0.0.1"], ServerAuth);
    let identity = pki.issue("node", &["node.fleet"], ClientAuth);
    let pool = "trust_webnode_mtls";
    let text =
        registry_config(pool, &[], "1s", "") + &mtls_table(&server, &pki.ca_path("fleet-ca"));
    let running = balancer(&text).await;
    let url = format!("https://{}", running.registry_addr().unwrap());
    let listen = free_port().await;
    let ca = pki.ca_path("fleet-ca");
    let _node = registering_node(
        "mtls-node",
        listen,
        &url,
        &[
            "--registry-ca",
            ca.to_str().unwrap(),
            "--registry-cert",
            identity.0.to_str().unwrap(),
            "--registry-key",
            identity.1.to_str().unwrap(),
        ],
        &[],
    );
    wait_until("the node registered over mutual TLS is up", || async {
        state_of(&running, pool, "mtls-node").await.as_deref() == Some("up")
    })
    .await;
    assert_eq!(
        listed(&running, pool).await[0].1,
        listen.to_string(),
        "registered at its listen address"
    );
}
