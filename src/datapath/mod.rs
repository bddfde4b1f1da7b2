//! The data path: accept, TLS, hyper connections and drains ([`server`]), and what happens to
//! a request once parsed, route → pick → forward → respond ([`proxy`]), with the head rewrite
//! ([`headers`]), the client-side body ([`body`]), TLS termination ([`tls`]), the PROXY
//! protocol header of an L4 tier in front ([`proxy_protocol`]), the one way a listener is
//! bound and served ([`listeners`]), and the access log ([`access_log`]).

pub(crate) mod access_log;
pub(crate) mod body;
pub mod headers;
pub(crate) mod listeners;
pub(crate) mod proxy;
pub(crate) mod proxy_protocol;
pub(crate) mod server;
pub(crate) mod tls;
