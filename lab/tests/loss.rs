//! nftables input loss: 5% configured must drop about 5% of a UDP stream, 0% without the rule.

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use fleetcast_lab::{Lab, LabConfig};

const COUNT: u32 = 20_000;
const WINDOW: u32 = 64;

/// Sends `COUNT` numbered datagrams from host 0 to host 1 port `port` and returns how many
/// distinct ones arrived. The sender never runs more than `WINDOW` datagrams ahead of the
/// highest one received, so the receiver's socket buffer cannot overflow even on a busy
/// machine: every loss is the network's.
fn stream(lab: &Lab, port: u16) -> u32 {
    let rx = lab.host(1).udp_socket(port).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = lab.host(0).udp_socket(0).unwrap();
    let to = SocketAddrV4::new(lab.host(1).addr(), port);
    let highest = AtomicU32::new(0);
    let done = AtomicBool::new(false);
    std::thread::scope(|s| {
        let receiver = s.spawn(|| {
            let mut seen = vec![false; COUNT as usize];
            let mut buf = [0u8; 64];
            // Ends 2 s after the last datagram (or after COUNT of them).
            let mut got = 0;
            while let Ok(n) = rx.recv(&mut buf) {
                assert_eq!(n, 32);
                let i = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                highest.fetch_max(i as u32, Ordering::Relaxed);
                if !std::mem::replace(&mut seen[i], true) {
                    got += 1;
                }
                if got == COUNT {
                    break;
                }
            }
            done.store(true, Ordering::Relaxed);
            got
        });
        let mut payload = [0u8; 32];
        for i in 0..COUNT {
            payload[..4].copy_from_slice(&i.to_be_bytes());
            tx.send_to(&payload, to).unwrap();
            // Wait (at most 20 ms: the window's last datagrams may all be lost) for the
            // receiver to catch up.
            for _ in 0..200 {
                if i < highest.load(Ordering::Relaxed) + WINDOW || done.load(Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(Duration::from_micros(100));
            }
        }
        receiver.join().unwrap()
    })
}

/// Packets dropped by the loss rule, from its nft counter.
fn nft_drops(lab: &Lab) -> u64 {
    let out = lab
        .host(1)
        .command(fleetcast_lab::tool_path("nft", "nftables").unwrap())
        .args(["list", "table", "inet", "lab_loss"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    let after = text.split("counter packets ").nth(1).expect(&text);
    after.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn five_percent_input_loss_drops_about_five_percent() {
    let lab = Lab::new(LabConfig::hosts(2)).unwrap();

    // Without a rule the path is lossless, so the loss below is the rule's doing.
    assert_eq!(stream(&lab, 5000), COUNT, "baseline stream lost datagrams");

    lab.host(1).loss_in(&[5000], 5.0).unwrap();
    let lost = COUNT - stream(&lab, 5000);
    // Binomial(20000, 0.05): mean 1000, standard deviation 30.8. 800..=1200 is +-6.5 sigma:
    // a correct rule fails it with probability < 1e-10, and 0%, 2.5% or 10% cannot pass.
    eprintln!("5% rule: lost {lost} of {COUNT}");
    assert!(
        (800..=1200).contains(&lost),
        "lost {lost} of {COUNT}, expected ~1000"
    );
    // Every loss was the rule's: its counter matches exactly.
    assert_eq!(nft_drops(&lab), u64::from(lost));

    // Other ports are untouched, and clearing the rule restores a lossless path.
    assert_eq!(stream(&lab, 5001), COUNT, "port 5001 is not under the rule");
    lab.host(1).clear_loss().unwrap();
    assert_eq!(stream(&lab, 5000), COUNT, "loss after clear_loss");
}

#[test]
fn a_gso_message_reaches_the_receiver_as_separate_datagrams() {
    use std::os::fd::AsRawFd;
    let lab = Lab::new(LabConfig::hosts(2)).unwrap();
    // Counts every packet to port 5002 on host 1's input, where loss rules sit.
    lab.host(1)
        .nft(
            "table inet gso_count {\n  chain input {\n    \
             type filter hook input priority -20; policy accept;\n    \
             udp dport 5002 counter\n  }\n}\n",
        )
        .unwrap();
    let rx = lab.host(1).udp_socket(5002).unwrap();
    rx.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let tx = lab.host(0).udp_socket(0).unwrap();
    tx.connect(SocketAddrV4::new(lab.host(1).addr(), 5002))
        .unwrap();
    // One send of 4 × 1000 bytes with UDP_SEGMENT 1000: one message, four datagrams.
    let seg: libc::c_int = 1000;
    // SAFETY: setsockopt reads a c_int from a live local for the given length.
    let ok = unsafe {
        libc::setsockopt(
            tx.as_raw_fd(),
            libc::SOL_UDP,
            libc::UDP_SEGMENT,
            (&seg as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    } == 0;
    assert!(ok, "UDP_SEGMENT: {}", std::io::Error::last_os_error());
    assert_eq!(tx.send(&[9u8; 4000]).unwrap(), 4000);
    let mut buf = [0u8; 4096];
    for _ in 0..4 {
        assert_eq!(rx.recv(&mut buf).unwrap(), 1000);
    }
    // Cut at the sender's interface: host 1's input saw four packets, not one, so a loss
    // rule there drops datagrams, never a whole GSO message.
    let out = lab
        .host(1)
        .command(fleetcast_lab::tool_path("nft", "nftables").unwrap())
        .args(["list", "table", "inet", "gso_count"])
        .output()
        .unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("counter packets 4 "), "{text}");
}
