//! The accept loop: one task per connection, a connection limit (`Error{Busy}` beyond it), a
//! graceful stop.

use std::fmt;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use veil_core::wire::auth::PskKey;
use veil_core::wire::busy_frame;

use crate::batch::{BatchConfig, Batcher};
use crate::conn::{handle_connection_with, linger, LINGER_BYTES};
use crate::ServerWeights;

/// Limits of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Most rows accepted in one `Compute` (announced in `Welcome`); at least 1.
    pub max_rows: u32,
    /// Most connections served at once; more are answered `Error{Busy}` and closed.
    pub max_connections: usize,
    /// Longest wait for the client's next bytes (and for it to read ours) before the connection
    /// is refused `Timeout` (or dropped).
    pub idle_timeout: Duration,
    /// With a key, clients must prove they hold it in the hello; without, anyone may connect.
    pub psk: Option<PskKey>,
    /// Offline-phase input ciphertexts one connection may send (each 32 KiB up and
    /// `out_dim · 8192` multiply-adds here); 0 turns the offline phase off.
    pub offline_inputs: u64,
    /// Send `linear.veil` to a client that asks (once per connection: a client without the
    /// linear weights derives its secret check data from them).
    pub serve_weights: bool,
    /// Offline layers in progress at once, over every connection served with this config (its
    /// clones share it): each holds the layer's input ciphertexts, `in · 64 KiB` (192 MiB for
    /// distilgpt2's `mlp.c_proj`), so this bounds the offline phase's memory.
    pub offline_layers: OfflineLimit,
}

/// A limit on offline layers in progress, shared by the connections of one server.
#[derive(Clone, Debug)]
pub struct OfflineLimit(pub(crate) Arc<Semaphore>);

/// Two limits are equal when they are the same shared limit.
impl PartialEq for OfflineLimit {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.0, &other.0)
    }
}

impl Eq for OfflineLimit {}

impl OfflineLimit {
    /// At most `layers` at once (at least 1).
    pub fn new(layers: usize) -> Self {
        OfflineLimit(Arc::new(Semaphore::new(layers.max(1))))
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_rows: 64,
            max_connections: 64,
            idle_timeout: Duration::from_secs(300),
            psk: None,
            // About 32 GiB up: some 30 batches of 4096 distilgpt2 tokens.
            offline_inputs: 1 << 20,
            serve_weights: true,
            offline_layers: OfflineLimit::new(2),
        }
    }
}

/// Accepts connections on `listener` until `shutdown` completes, serving each on its own task,
/// with a [`Batcher`] of the default [`BatchConfig`] (see [`serve_with`]).
///
/// At most `config.max_connections` are served at once; others get `Error{Busy}` and are closed.
/// Returns as soon as `shutdown` fires (no new connections); connections in flight keep running
/// on the runtime until it is shut down.
pub async fn serve(
    listener: TcpListener,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    shutdown: impl Future,
) {
    let batcher = match Batcher::new(weights.clone(), BatchConfig::default()) {
        Ok(b) => Some(b),
        Err(e) => {
            log(
                "listener",
                format_args!("no batching (cannot start its threads: {e})"),
            );
            None
        }
    };
    serve_with(listener, weights, config, batcher, shutdown).await;
}

/// [`serve`] with the caller's batcher (to choose its limits or read its [`Batcher::stats`]), or
/// none: each request is then multiplied on its own on the blocking pool.
pub async fn serve_with(
    listener: TcpListener,
    weights: Arc<ServerWeights>,
    config: ServerConfig,
    batcher: Option<Batcher>,
    shutdown: impl Future,
) {
    let config = ServerConfig {
        max_rows: config.max_rows.max(1),
        max_connections: config.max_connections.max(1),
        ..config
    };
    let permits = Arc::new(Semaphore::new(config.max_connections));
    // Busy replies linger a few seconds each; bound them too, so a flood costs no more than this.
    let busy_permits = Arc::new(Semaphore::new(config.max_connections));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => {
                log("listener", "shutting down: no longer accepting connections");
                return;
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    // 25 small round trips per token: never wait for Nagle.
                    let _ = stream.set_nodelay(true);
                    match permits.clone().try_acquire_owned() {
                        Ok(permit) => {
                            let weights = weights.clone();
                            let config = config.clone();
                            let batcher = batcher.clone();
                            tokio::spawn(async move {
                                log(peer, "connected");
                                match handle_connection_with(stream, weights, config, batcher)
                                    .await
                                {
                                    Ok(end) => log(peer, format_args!("disconnected: {end}")),
                                    Err(e) => log(peer, format_args!("disconnected: {e}")),
                                }
                                drop(permit);
                            });
                        }
                        Err(_) => {
                            log(peer, format_args!(
                                "refused: at the limit of {} connections", config.max_connections
                            ));
                            let Ok(busy) = busy_permits.clone().try_acquire_owned() else {
                                continue; // Flooded: drop without a reply.
                            };
                            tokio::spawn(async move {
                                let _busy = busy;
                                let mut stream = stream;
                                let mut buf = [0u8; 64];
                                let Ok(n) = busy_frame(&mut buf) else { return };
                                let limit = Duration::from_secs(5);
                                let sent = tokio::time::timeout(limit, async {
                                    stream.write_all(&buf[..n]).await?;
                                    stream.flush().await
                                })
                                .await;
                                if matches!(sent, Ok(Ok(()))) {
                                    linger(&mut stream, &mut buf, limit, LINGER_BYTES).await;
                                }
                            });
                        }
                    }
                }
                Err(e) => {
                    // Typically out of file descriptors: back off instead of spinning.
                    log("listener", format_args!("accept failed: {e}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

fn log(peer: impl fmt::Display, what: impl fmt::Display) {
    eprintln!("veil-server: {peer}: {what}");
}
