//! `convstore reload --pid PID`: what `systemctl reload convstore` runs
//! (ExecReload). Validates the configuration first, so a bad file fails the
//! reload where the operator sees it, then sends SIGHUP to the daemon, which
//! re-reads the file and applies what can change live. No `kill` binary is
//! needed on the machine.

use std::path::Path;
use std::process::ExitCode;

use crate::config::Settings;

#[derive(Debug, clap::Args)]
pub struct ReloadArgs {
    /// The daemon's process id (systemd: $MAINPID).
    #[arg(long)]
    pub pid: u32,
}

pub fn run(config: Option<&Path>, args: &ReloadArgs) -> ExitCode {
    if let Err(e) = Settings::load(config) {
        eprintln!("convstore: not reloading, the configuration is invalid: {e}");
        return ExitCode::from(2);
    }
    let Ok(pid) = libc::pid_t::try_from(args.pid) else {
        eprintln!("convstore: --pid {} is not a process id", args.pid);
        return ExitCode::from(2);
    };
    if pid <= 1 {
        eprintln!("convstore: --pid {pid} is not a daemon's process id");
        return ExitCode::from(2);
    }
    // SAFETY: kill(2) takes plain integers and touches no memory of ours.
    let rc = unsafe { libc::kill(pid, libc::SIGHUP) };
    if rc != 0 {
        let e = std::io::Error::last_os_error();
        eprintln!("convstore: cannot send SIGHUP to process {pid}: {e}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
