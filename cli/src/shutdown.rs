//! [`Shutdown`]: Ctrl-C and SIGTERM as an awaitable, for the commands that run until stopped.

use anyhow::Context;

/// Ctrl-C and (on Unix) SIGTERM, listened for from the moment of [`Shutdown::install`].
pub struct Shutdown {
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
}

impl Shutdown {
    /// Starts listening for the signals; until then they kill the process as usual.
    #[cfg(unix)]
    pub fn install() -> anyhow::Result<Self> {
        use tokio::signal::unix::{signal, SignalKind};
        Ok(Shutdown {
            interrupt: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
            terminate: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
        })
    }

    /// Starts listening for Ctrl-C.
    #[cfg(not(unix))]
    pub fn install() -> anyhow::Result<Self> {
        Ok(Shutdown {})
    }

    /// Resolves when a shutdown signal arrives. Cancel-safe.
    #[cfg(unix)]
    pub async fn recv(&mut self) -> anyhow::Result<()> {
        tokio::select! {
            _ = self.interrupt.recv() => {}
            _ = self.terminate.recv() => {}
        }
        Ok(())
    }

    /// Resolves when Ctrl-C is pressed.
    #[cfg(not(unix))]
    pub async fn recv(&mut self) -> anyhow::Result<()> {
        Ok(tokio::signal::ctrl_c().await?)
    }
}
