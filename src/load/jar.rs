//! One virtual user's cookie jar: enough of RFC 6265 for a user that talks to one balancer.
//!
//! `Set-Cookie` stores or replaces a cookie by name; `Max-Age` (which wins over `Expires`) or
//! an `Expires` in the past deletes it; an expiry in the future is honoured when sending. All
//! cookies go back in one `Cookie` header, in the order they were first set. `Domain`, `Path`
//! and `Secure` are not matched: every request of a run goes to the same origin.

use std::time::{Duration, Instant};

use cookie::Cookie;
use cookie::time::OffsetDateTime;
use http::HeaderMap;
use http::header::{HeaderValue, SET_COOKIE};

/// The cookies one user holds.
#[derive(Debug, Default)]
pub(super) struct Jar {
    /// Few cookies per user, and the order they were first set is the order they are sent.
    cookies: Vec<Stored>,
}

#[derive(Debug)]
struct Stored {
    name: String,
    value: String,
    expires: Option<Instant>,
}

impl Jar {
    /// Takes in every `Set-Cookie` of a response. Unparsable ones are ignored, as browsers do.
    pub(super) fn store(&mut self, headers: &HeaderMap, now: Instant) {
        for header in headers.get_all(SET_COOKIE) {
            let Ok(text) = header.to_str() else { continue };
            let Ok(cookie) = Cookie::parse(text) else {
                continue;
            };
            let expires = match lifetime(&cookie) {
                Lifetime::Session => None,
                Lifetime::Until(left) => Some(now + left),
                Lifetime::Expired => {
                    self.cookies.retain(|c| c.name != cookie.name());
                    continue;
                }
            };
            let (name, value) = (cookie.name(), cookie.value());
            match self.cookies.iter_mut().find(|c| c.name == name) {
                Some(c) => {
                    value.clone_into(&mut c.value);
                    c.expires = expires;
                }
                None => self.cookies.push(Stored {
                    name: name.to_owned(),
                    value: value.to_owned(),
                    expires,
                }),
            }
        }
    }

    /// The `Cookie` header to send, or `None` for an empty jar. Drops cookies that expired.
    pub(super) fn header(&mut self, now: Instant) -> Option<HeaderValue> {
        self.cookies
            .retain(|c| c.expires.is_none_or(|expires| expires > now));
        if self.cookies.is_empty() {
            return None;
        }
        let mut line = String::new();
        for c in &self.cookies {
            if !line.is_empty() {
                line.push_str("; ");
            }
            line.push_str(&c.name);
            line.push('=');
            line.push_str(&c.value);
        }
        // The parts came out of valid header values, so this only fails on a hostile server's
        // bytes the parser let through; sending no cookie then is the honest answer.
        HeaderValue::from_str(&line).ok()
    }
}

enum Lifetime {
    Session,
    Until(Duration),
    Expired,
}

fn lifetime(cookie: &Cookie<'_>) -> Lifetime {
    if let Some(max_age) = cookie.max_age() {
        return match Duration::try_from(max_age) {
            Ok(left) if !left.is_zero() => Lifetime::Until(left),
            _ => Lifetime::Expired,
        };
    }
    match cookie.expires_datetime() {
        None => Lifetime::Session,
        Some(at) => match Duration::try_from(at - OffsetDateTime::now_utc()) {
            Ok(left) if !left.is_zero() => Lifetime::Until(left),
            _ => Lifetime::Expired,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(jar: &mut Jar, now: Instant, lines: &[&str]) {
        let mut headers = HeaderMap::new();
        for line in lines {
            headers.append(SET_COOKIE, HeaderValue::from_str(line).unwrap());
        }
        jar.store(&headers, now);
    }

    fn sent(jar: &mut Jar, now: Instant) -> Option<String> {
        jar.header(now).map(|v| v.to_str().unwrap().to_owned())
    }

    #[test]
    fn cookies_go_back_in_one_header_and_replace_by_name() {
        let now = Instant::now();
        let mut jar = Jar::default();
        assert_eq!(sent(&mut jar, now), None);
        set(
            &mut jar,
            now,
            &["a=1; Path=/; HttpOnly", "b=2; SameSite=Lax"],
        );
        assert_eq!(sent(&mut jar, now).as_deref(), Some("a=1; b=2"));
        set(&mut jar, now, &["a=3"]);
        assert_eq!(sent(&mut jar, now).as_deref(), Some("a=3; b=2"));
    }

    #[test]
    fn max_age_zero_and_past_expires_delete() {
        let now = Instant::now();
        let mut jar = Jar::default();
        set(&mut jar, now, &["a=1", "b=2", "c=3"]);
        set(
            &mut jar,
            now,
            &[
                "a=; Max-Age=0",
                "b=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT",
            ],
        );
        assert_eq!(sent(&mut jar, now).as_deref(), Some("c=3"));
        set(&mut jar, now, &["c=; Max-Age=-1"]);
        assert_eq!(sent(&mut jar, now), None);
        assert!(jar.cookies.is_empty());
    }

    #[test]
    fn max_age_expires_later_and_wins_over_expires() {
        let now = Instant::now();
        let mut jar = Jar::default();
        set(
            &mut jar,
            now,
            &["a=1; Max-Age=10; Expires=Thu, 01 Jan 1970 00:00:00 GMT"],
        );
        assert_eq!(
            sent(&mut jar, now + Duration::from_secs(9)).as_deref(),
            Some("a=1")
        );
        assert_eq!(sent(&mut jar, now + Duration::from_secs(10)), None);
        assert!(jar.cookies.is_empty());
    }

    #[test]
    fn garbage_is_ignored() {
        let now = Instant::now();
        let mut jar = Jar::default();
        set(&mut jar, now, &["no equals sign", "=novalue", "ok=1"]);
        assert_eq!(sent(&mut jar, now).as_deref(), Some("ok=1"));
    }
}
