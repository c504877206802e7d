//! Automatic certificates for `terminate = { acme = true }` routes: ACME (RFC 8555) orders
//! through instant-acme, validated with tls-alpn-01 (RFC 8737) on sniplex's own listeners, so no
//! port 80 and no separate client are needed.
//!
//! - [`Store`] holds the live certificate of each ACME name and the challenge certificates of
//!   orders in flight; handshakes read it, the manager writes it.
//! - [`manage`] is the one task that orders, stores and renews. It wakes at the earliest
//!   renewal or retry time, and on every reload.
//! - On disk (`[acme] storage`, created 0700): `account.json` and, per name, `NAME.crt` (chain)
//!   and `NAME.key`, each 0600, written to a temporary file and renamed into place. A file that
//!   does not load (half-written, corrupted, expired, for another name) is replaced by a new order.

use crate::config::{AcmeConfig, Config};
use crate::lock;
use crate::metrics as m;
use instant_acme::{
    Account, AccountCredentials, AuthorizationStatus, ChallengeType, Identifier, NewAccount,
    NewOrder, OrderStatus, RetryPolicy,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// The ALPN protocol of tls-alpn-01 validation handshakes.
pub const ACME_TLS_ALPN: &[u8] = b"acme-tls/1";
/// First retry after a failed order; doubled per failure up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_secs(30);
const MAX_BACKOFF: Duration = Duration::from_secs(6 * 3600);
/// How long the CA gets to validate and to issue, each.
const ORDER_TIMEOUT: Duration = Duration::from_secs(120);

/// Live ACME certificates and pending challenges, shared by every handshake.
#[derive(Debug, Default)]
pub struct Store {
    certs: Mutex<HashMap<String, Arc<CertifiedKey>>>,
    challenges: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
}

static STORE: LazyLock<Store> = LazyLock::new(Store::default);

/// The process-wide store: certificates outlive config reloads, so they live beside them, not
/// in them.
pub fn store() -> &'static Store {
    &STORE
}

impl Store {
    pub fn cert(&self, name: &str) -> Option<Arc<CertifiedKey>> {
        lock(&self.certs).get(name).cloned()
    }

    /// The challenge answer for `name`, while an order for it waits for validation.
    pub fn challenge(&self, name: &str) -> Option<Arc<rustls::ServerConfig>> {
        lock(&self.challenges).get(name).cloned()
    }

    fn install(&self, name: &str, cert: Arc<CertifiedKey>) {
        lock(&self.certs).insert(name.to_owned(), cert);
    }
}

/// Serves the store's current certificate for one name.
#[derive(Debug)]
struct Resolver(String);

impl ResolvesServerCert for Resolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        store().cert(&self.0)
    }
}

/// The server config of an `acme = true` route: its certificate is looked up per handshake, so
/// a renewal takes effect for the next connection without a reload.
pub fn server_config(name: &str, alpn: &[Vec<u8>]) -> Result<Arc<rustls::ServerConfig>, String> {
    crate::tls::with_tickets(crate::tls::config_with(
        Arc::new(Resolver(name.to_owned())),
        alpn,
    )?)
}

/// RFC 8737 section 3: a self-signed certificate for `name` carrying the critical
/// acmeIdentifier extension (the SHA-256 of the key authorization), offered only with ALPN
/// `acme-tls/1`.
pub fn challenge_config(name: &str, digest: &[u8]) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned()]).map_err(|e| e.to_string())?;
    params.custom_extensions = vec![rcgen::CustomExtension::new_acme_identifier(digest)];
    let key = rcgen::KeyPair::generate().map_err(|e| e.to_string())?;
    let cert = params.self_signed(&key).map_err(|e| e.to_string())?;
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| e.to_string())?;
    let provider = crate::tls::provider();
    // Not `with_single_cert`: it checks the certificate with webpki, which refuses the
    // critical acmeIdentifier extension that the validating CA looks for.
    let signer = provider
        .key_provider
        .load_private_key(key_der)
        .map_err(|e| e.to_string())?;
    let certified = CertifiedKey::new(vec![cert.der().clone()], signer);
    let resolver = Arc::new(rustls::sign::SingleCertAndKey::from(certified));
    let config = crate::tls::config_with(resolver, &[ACME_TLS_ALPN.to_vec()])?;
    Ok(Arc::new(config))
}

/// A stored certificate that loaded, with its validity window (Unix seconds).
#[derive(Debug)]
struct Loaded {
    key: Arc<CertifiedKey>,
    not_before: i64,
    not_after: i64,
}

fn cert_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.crt"))
}

fn key_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}.key"))
}

/// Parses a chain and key (PEM) and checks they belong together and cover `name`.
fn parse(name: &str, chain_pem: &[u8], key_pem: &[u8]) -> Result<Loaded, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate chain: {e:?}"))?;
    let leaf = chain.first().ok_or("no certificate in the chain file")?;
    let (_, x509) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| format!("leaf certificate: {e}"))?;
    let validity = x509.validity();
    let (not_before, not_after) = (
        validity.not_before.timestamp(),
        validity.not_after.timestamp(),
    );
    let covers = x509
        .subject_alternative_name()
        .ok()
        .flatten()
        .is_some_and(|san| {
            san.value.general_names.iter().any(|g| {
                matches!(g, x509_parser::extensions::GeneralName::DNSName(d) if d.eq_ignore_ascii_case(name))
            })
        });
    if !covers {
        return Err(format!("the certificate does not name {name}"));
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| format!("private key: {e:?}"))?;
    let certified = crate::tls::certified_key(chain, key).map_err(|e| match e {
        crate::tls::KeyError::Mismatch(_) => "the key does not match the certificate".to_owned(),
        crate::tls::KeyError::Other(e) => format!("certificate and key: {e}"),
    })?;
    Ok(Loaded {
        key: Arc::new(certified),
        not_before,
        not_after,
    })
}

fn load(dir: &Path, name: &str) -> Result<Loaded, String> {
    let chain = std::fs::read(cert_path(dir, name)).map_err(|e| e.to_string())?;
    let key = std::fs::read(key_path(dir, name)).map_err(|e| e.to_string())?;
    parse(name, &chain, &key)
}

/// Writes `bytes` to `path` atomically: a 0600 temporary file beside it, fsynced, renamed.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

fn ensure_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn now_unix() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// When a certificate is due: `renew_before` ahead of its end, or when a third of its
/// lifetime is left.
fn renew_at(l: &Loaded, renew_before: Option<Duration>) -> i64 {
    let window = match renew_before {
        Some(d) => d.as_secs() as i64,
        None => (l.not_after - l.not_before) / 3,
    };
    l.not_after - window
}

/// Per-name scheduling state kept by the manager.
#[derive(Debug, Default)]
struct NameState {
    /// Unix time of the next attempt (renewal or retry).
    next: i64,
    failures: u32,
    /// The stored certificate was read (at start, once per name).
    loaded: bool,
}

/// Orders, stores and renews certificates for the config's `acme = true` names until `stop`.
/// `wake` is notified on every reload.
pub async fn manage(shared: Arc<crate::conn::Shared>, wake: Arc<Notify>, stop: CancellationToken) {
    let mut names: HashMap<String, NameState> = HashMap::new();
    let mut account: Option<(String, Account)> = None;
    loop {
        let cfg: Arc<Config> = shared.config.load_full();
        let mut sleep_for = Duration::from_secs(24 * 3600);
        if let Some(acme) = cfg.acme.as_ref().filter(|_| !cfg.acme_names.is_empty()) {
            names.retain(|n, _| cfg.acme_names.contains(n));
            for name in &cfg.acme_names {
                let st = names.entry(name.clone()).or_default();
                if !st.loaded {
                    st.loaded = true;
                    st.next = startup(acme, name);
                }
                if st.next > now_unix() {
                    continue;
                }
                let ordered = tokio::select! {
                    _ = stop.cancelled() => return,
                    r = renew(acme, name, &mut account) => r,
                };
                match ordered {
                    Ok(l) => {
                        st.failures = 0;
                        st.next = renew_at(&l, acme.renew_before).max(now_unix() + 60);
                    }
                    Err(e) => {
                        st.failures += 1;
                        let backoff = FIRST_BACKOFF
                            .saturating_mul(1 << st.failures.min(16).saturating_sub(1))
                            .min(MAX_BACKOFF);
                        tracing::warn!(name, failures = st.failures, retry_in = ?backoff, "ACME order failed: {e}");
                        st.next = now_unix() + backoff.as_secs() as i64;
                    }
                }
            }
            let now = now_unix();
            if let Some(next) = names.values().map(|s| s.next).min() {
                sleep_for = Duration::from_secs(next.saturating_sub(now).max(1) as u64);
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = wake.notified() => {}
            _ = tokio::time::sleep(sleep_for) => {}
        }
    }
}

/// At start (or when a name first appears): install a usable stored certificate and return
/// when it is due; a missing or unusable one is due now.
fn startup(acme: &AcmeConfig, name: &str) -> i64 {
    match load(&acme.storage, name) {
        Ok(l) if l.not_after > now_unix() => {
            let at = renew_at(&l, acme.renew_before);
            tracing::info!(
                name,
                expires = l.not_after,
                renew_at = at,
                "using the stored ACME certificate"
            );
            publish(name, &l);
            at
        }
        Ok(_) => {
            tracing::warn!(
                name,
                "the stored certificate has expired; ordering a new one"
            );
            0
        }
        Err(e) if cert_path(&acme.storage, name).exists() => {
            tracing::warn!(
                name,
                "the stored certificate is unusable ({e}); ordering a new one"
            );
            0
        }
        Err(_) => {
            tracing::info!(name, "no stored certificate; ordering one");
            0
        }
    }
}

fn publish(name: &str, l: &Loaded) {
    store().install(name, l.key.clone());
    metrics::gauge!(m::CERTIFICATE_EXPIRY_SECONDS, "route" => name.to_owned())
        .set(l.not_after as f64);
}

/// One order for `name`, stored and installed on success. The old certificate keeps serving
/// until the new one is in place.
async fn renew(
    acme: &AcmeConfig,
    name: &str,
    account: &mut Option<(String, Account)>,
) -> Result<Loaded, String> {
    let result = async {
        ensure_dir(&acme.storage).map_err(|e| format!("{}: {e}", acme.storage.display()))?;
        let acct = match account {
            Some((dir, a)) if *dir == acme.directory => a,
            _ => {
                let a = open_account(acme).await?;
                &mut account.insert((acme.directory.clone(), a)).1
            }
        };
        let (chain, key) = match order(acct, name).await {
            Ok(x) => x,
            Err(e) => {
                // The next attempt opens the account again (it may have been deactivated).
                *account = None;
                return Err(e);
            }
        };
        let l = parse(name, chain.as_bytes(), key.as_bytes())
            .map_err(|e| format!("the CA's certificate does not load: {e}"))?;
        write_atomic(&key_path(&acme.storage, name), key.as_bytes())
            .and_then(|_| write_atomic(&cert_path(&acme.storage, name), chain.as_bytes()))
            .map_err(|e| format!("storing the certificate: {e}"))?;
        Ok(l)
    }
    .await;
    match &result {
        Ok(l) => {
            metrics::counter!(m::ACME_ORDERS_TOTAL, "result" => "ok").increment(1);
            tracing::info!(name, expires = l.not_after, "ACME certificate issued");
            publish(name, l);
        }
        Err(_) => metrics::counter!(m::ACME_ORDERS_TOTAL, "result" => "error").increment(1),
    }
    result
}

/// The stored account, or a new one (stored) when there is none or it does not load.
async fn open_account(acme: &AcmeConfig) -> Result<Account, String> {
    let builder = || match &acme.ca_bundle {
        Some(ca) => Account::builder_with_root(ca),
        None => Account::builder(),
    };
    let path = acme.storage.join("account.json");
    if let Ok(bytes) = std::fs::read(&path) {
        match serde_json::from_slice::<StoredAccount>(&bytes) {
            Ok(stored) if stored.directory != acme.directory => tracing::info!(
                old = %stored.directory,
                "the stored ACME account belongs to another directory; creating a new one"
            ),
            Ok(StoredAccount {
                credentials: creds, ..
            }) => match builder()
                .map_err(|e| e.to_string())?
                .from_credentials(creds)
                .await
            {
                Ok(a) => return Ok(a),
                Err(e) => {
                    tracing::warn!("stored ACME account does not load ({e}); creating a new one")
                }
            },
            Err(e) => tracing::warn!("{}: unusable ({e}); creating a new account", path.display()),
        }
    }
    let contact: Vec<&str> = acme.contact.iter().map(String::as_str).collect();
    let (account, creds) = builder()
        .map_err(|e| format!("ACME client: {e}"))?
        .create(
            &NewAccount {
                contact: &contact,
                terms_of_service_agreed: true,
                only_return_existing: false,
            },
            acme.directory.clone(),
            None,
        )
        .await
        .map_err(|e| format!("creating the ACME account at {}: {e}", acme.directory))?;
    let stored = StoredAccount {
        directory: acme.directory.clone(),
        credentials: creds,
    };
    let json = serde_json::to_vec(&stored).map_err(|e| e.to_string())?;
    write_atomic(&path, &json).map_err(|e| format!("{}: {e}", path.display()))?;
    tracing::info!(directory = %acme.directory, "ACME account created");
    Ok(account)
}

/// `account.json`: the account's credentials and the directory they belong to.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAccount {
    directory: String,
    credentials: AccountCredentials,
}

/// Removes a name's challenge answer when the order ends, however it ends.
struct ChallengeGuard<'a>(&'a str);

impl Drop for ChallengeGuard<'_> {
    fn drop(&mut self) {
        lock(&store().challenges).remove(self.0);
    }
}

async fn order(account: &Account, name: &str) -> Result<(String, String), String> {
    let e = |what: &str| {
        let what = what.to_owned();
        move |err: instant_acme::Error| format!("{what}: {err}")
    };
    let ids = [Identifier::Dns(name.to_owned())];
    let mut order = account
        .new_order(&NewOrder::new(&ids))
        .await
        .map_err(e("new order"))?;
    let _guard = ChallengeGuard(name);
    let mut authorizations = order.authorizations();
    while let Some(authz) = authorizations.next().await {
        let mut authz = authz.map_err(e("authorization"))?;
        match authz.status {
            AuthorizationStatus::Valid => continue,
            AuthorizationStatus::Pending => {}
            other => return Err(format!("authorization is {other:?}")),
        }
        let mut challenge = authz
            .challenge(ChallengeType::TlsAlpn01)
            .ok_or("the CA offers no tls-alpn-01 challenge")?;
        let answer = challenge_config(name, challenge.key_authorization().digest().as_ref())?;
        lock(&store().challenges).insert(name.to_owned(), answer);
        challenge.set_ready().await.map_err(e("challenge"))?;
    }
    let retry = RetryPolicy::new().timeout(ORDER_TIMEOUT);
    match order.poll_ready(&retry).await.map_err(e("validation"))? {
        OrderStatus::Ready => {}
        other => return Err(format!("order is {other:?} after validation")),
    }
    let key = order.finalize().await.map_err(e("finalize"))?;
    let chain = order
        .poll_certificate(&retry)
        .await
        .map_err(e("certificate"))?;
    Ok((chain, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// rcgen's default validity: 1975 to 4096.
    fn issued(name: &str) -> (String, String) {
        let params = rcgen::CertificateParams::new(vec![name.to_owned()]).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    #[test]
    fn stored_files_load_and_bad_ones_are_refused() {
        let (chain, key) = issued("blog.test");
        let l = parse("blog.test", chain.as_bytes(), key.as_bytes()).unwrap();
        assert!(l.not_before < now_unix() && l.not_after > now_unix());
        // Renewal when a third is left, or `renew_before` ahead.
        assert_eq!(
            renew_at(&l, None),
            l.not_after - (l.not_after - l.not_before) / 3
        );
        assert_eq!(
            renew_at(&l, Some(Duration::from_secs(3600))),
            l.not_after - 3600
        );

        assert!(parse("other.test", chain.as_bytes(), key.as_bytes())
            .unwrap_err()
            .contains("does not name"));
        let half = &chain.as_bytes()[..chain.len() / 2];
        assert!(parse("blog.test", half, key.as_bytes()).is_err());
        let (_, other_key) = issued("blog.test");
        assert!(parse("blog.test", chain.as_bytes(), other_key.as_bytes())
            .unwrap_err()
            .contains("does not match"));
        assert!(parse("blog.test", b"", key.as_bytes()).is_err());
    }

    #[test]
    fn atomic_writes_are_private_and_replace_whole_files() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = dir.path().join("acme");
        ensure_dir(&store).unwrap();
        assert_eq!(
            std::fs::metadata(&store).unwrap().permissions().mode() & 0o777,
            0o700
        );
        let p = store.join("x.crt");
        write_atomic(&p, b"first version, longer").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert!(!p.with_extension("tmp").exists());
    }

    #[test]
    fn challenge_certificate_carries_the_acme_identifier() {
        let digest = [0xabu8; 32];
        let config = challenge_config("blog.test", &digest).unwrap();
        assert_eq!(config.alpn_protocols, vec![ACME_TLS_ALPN.to_vec()]);
    }
}
