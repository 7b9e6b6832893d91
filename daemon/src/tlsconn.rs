//! One TLS connection on a non-blocking `mio` socket: ciphertext in and out of the socket,
//! plaintext in and out of the session core.
//!
//! The connection never blocks: reads drain until `WouldBlock` (or the caller's budget),
//! writes go until `WouldBlock` and the caller asks for `WRITABLE` while [`TlsConn::wants_write`].

use std::io::{self, Read, Write};

use mio::net::TcpStream;
use rustls::ServerConnection;

/// What a read pass produced.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ReadOutcome {
    /// Plaintext bytes appended to the caller's buffer.
    pub plaintext: usize,
    /// The peer closed (EOF or close_notify).
    pub eof: bool,
    /// Bytes read from the socket (ciphertext).
    pub wire_bytes: usize,
}

/// A TLS server connection over a `mio` TCP stream.
pub struct TlsConn {
    /// The socket.
    pub sock: TcpStream,
    /// The rustls state.
    pub tls: ServerConnection,
}

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("peer", &self.sock.peer_addr().ok())
            .finish_non_exhaustive()
    }
}

impl TlsConn {
    /// Wraps an accepted socket.
    pub fn new(sock: TcpStream, tls: ServerConnection) -> Self {
        TlsConn { sock, tls }
    }

    /// Reads ciphertext until `WouldBlock` or `max_wire` bytes, processes it, and appends the
    /// plaintext to `plain`. A TLS error is returned after the alert has been queued (call
    /// [`TlsConn::flush`] once more to send it).
    pub fn read(&mut self, plain: &mut Vec<u8>, max_wire: usize) -> io::Result<ReadOutcome> {
        let mut out = ReadOutcome::default();
        while out.wire_bytes < max_wire {
            match self.tls.read_tls(&mut self.sock) {
                Ok(0) => {
                    out.eof = true;
                    break;
                }
                Ok(n) => {
                    out.wire_bytes += n;
                    let state = self
                        .tls
                        .process_new_packets()
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let avail = state.plaintext_bytes_to_read();
                    if avail > 0 {
                        let start = plain.len();
                        plain.resize(start + avail, 0);
                        let got = self.tls.reader().read(&mut plain[start..])?;
                        plain.truncate(start + got);
                        out.plaintext += got;
                    }
                    if state.peer_has_closed() {
                        out.eof = true;
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Queues plaintext for sending (encrypted into rustls's buffer).
    pub fn write_plain(&mut self, data: &[u8]) -> io::Result<()> {
        self.tls.writer().write_all(data)
    }

    /// Writes buffered ciphertext to the socket until done or `WouldBlock`. Returns bytes written.
    pub fn flush(&mut self) -> io::Result<usize> {
        let mut n = 0;
        while self.tls.wants_write() {
            match self.tls.write_tls(&mut self.sock) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    /// Whether ciphertext is waiting for the socket.
    pub fn wants_write(&self) -> bool {
        self.tls.wants_write()
    }

    /// Whether the handshake has finished.
    pub fn handshake_done(&self) -> bool {
        !self.tls.is_handshaking()
    }
}
