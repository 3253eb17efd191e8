//! `ExitSignals` in real processes: this test runs without libtest's harness (whose main thread
//! would take the signals) and starts itself again for each case, named by an environment
//! variable; the child blocks the signals, waits, and ends with `_exit`.

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vhost_backend_kit::signals::{ExitSignals, STATUS_CLEANUP_FAILED};

const CASE: &str = "KIT_SIGNALS_CASE";
const DEADLINE: Duration = Duration::from_millis(700);

fn main() {
    if let Ok(case) = std::env::var(CASE) {
        child(&case);
    }
    let cases: [(&str, fn()); 6] = [
        ("the cleanup's status is the exit status", the_cleanups_status_is_the_exit_status),
        ("without a cleanup the exit is clean", without_a_cleanup_the_exit_is_clean),
        ("a hung cleanup ends at its deadline", a_hung_cleanup_ends_at_its_deadline),
        ("a second signal ends a hung cleanup at once", a_second_signal_ends_a_hung_cleanup_at_once),
        ("a panicking cleanup is a failure status", a_panicking_cleanup_is_a_failure_status),
        ("a held stderr lock does not stop the exit", a_held_stderr_lock_does_not_stop_the_exit),
    ];
    for (name, case) in cases {
        case();
        println!("test {name} ... ok");
    }
}

/// The child side: sets the case up, prints `armed`, waits for signals.
fn child(case: &str) -> ! {
    let exit = ExitSignals::install(DEADLINE).expect("install");
    match case {
        "status" => exit.on_exit(|sig| if sig == libc::SIGTERM { 42 } else { 3 }),
        "hang" => exit.on_exit(|_| loop {
            std::thread::park();
        }),
        "panic" => exit.on_exit(|_| panic!("cleanup failed")),
        "stderr-lock" => {
            // Another thread holds std's stderr lock for ever, as one blocked on a full pipe
            // does; the daemon logs through the kit's writer.
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || {
                let _held = std::io::stderr().lock();
                let _ = tx.send(());
                loop {
                    std::thread::park();
                }
            });
            let _ = rx.recv();
            vhost_backend_kit::logging::init("KIT_TEST_LOG", "info");
            tracing::info!("logging works with std's stderr lock held");
            exit.on_exit(|_| {
                tracing::info!("cleaning up");
                5
            });
        }
        "no-cleanup" => {}
        other => panic!("unknown case {other}"),
    }
    let mut out = std::io::stdout();
    let _ = writeln!(out, "armed");
    let _ = out.flush();
    loop {
        std::thread::park();
    }
}

/// Runs `case` in a child, sends it `signals` (200 ms apart); its exit code and the time from
/// the first signal to its end.
fn run_case(case: &str, signals: &[i32], stderr: Stdio) -> (Option<i32>, Duration) {
    let exe = std::env::current_exe().expect("test executable");
    let mut child = Command::new(exe)
        .env(CASE, case)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("child");
    let mut out = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    std::io::BufRead::read_line(&mut out, &mut line).expect("armed line");
    assert_eq!(line, "armed\n", "case {case}");
    let t0 = Instant::now();
    for (i, &s) in signals.iter().enumerate() {
        if i > 0 {
            std::thread::sleep(Duration::from_millis(200));
        }
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(child.id() as i32, s) };
    }
    let give_up = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return (st.code(), t0.elapsed());
        }
        if Instant::now() > give_up {
            let _ = child.kill();
            let _ = child.wait();
            panic!("case {case}: still running 10 s after the signal");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn the_cleanups_status_is_the_exit_status() {
    let (code, took) = run_case("status", &[libc::SIGTERM], Stdio::null());
    assert_eq!(code, Some(42));
    assert!(took < Duration::from_secs(1), "{took:?}");
    assert_eq!(run_case("status", &[libc::SIGINT], Stdio::null()).0, Some(3));
}

fn without_a_cleanup_the_exit_is_clean() {
    assert_eq!(run_case("no-cleanup", &[libc::SIGHUP], Stdio::null()).0, Some(0));
}

fn a_hung_cleanup_ends_at_its_deadline() {
    let (code, took) = run_case("hang", &[libc::SIGTERM], Stdio::null());
    assert_eq!(code, Some(STATUS_CLEANUP_FAILED));
    assert!(took >= DEADLINE - Duration::from_millis(50) && took < Duration::from_secs(3), "{took:?}");
}

fn a_second_signal_ends_a_hung_cleanup_at_once() {
    let (code, took) = run_case("hang", &[libc::SIGTERM, libc::SIGINT], Stdio::null());
    assert_eq!(code, Some(128 + libc::SIGINT));
    assert!(took < DEADLINE - Duration::from_millis(50), "before the deadline: {took:?}");
}

fn a_panicking_cleanup_is_a_failure_status() {
    assert_eq!(run_case("panic", &[libc::SIGTERM], Stdio::null()).0, Some(STATUS_CLEANUP_FAILED));
}

fn a_held_stderr_lock_does_not_stop_the_exit() {
    let (code, took) = run_case("stderr-lock", &[libc::SIGTERM], Stdio::piped());
    assert_eq!(code, Some(5));
    assert!(took < Duration::from_secs(1), "{took:?}");
}
