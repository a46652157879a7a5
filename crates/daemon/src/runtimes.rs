//! The two runtimes of `convstore serve` (docs/PERFORMANCE.md "The
//! acknowledgement path under load").
//!
//! Intake runs ~60 times faster than storage, so when conversations arrive
//! faster than PostgreSQL can index them, the pipeline and PostgreSQL take
//! every core; an acknowledging thread then waits for a CPU slice, and a
//! 20 µs answer takes milliseconds. So:
//!
//! - **ingress** (`server.ingress_threads`, normal priority): accepting,
//!   reading, parsing, validating, enqueueing and answering. The runtime
//!   `convstore serve` blocks on; the listeners are opened and served here.
//! - **pipeline** (one thread per core, `pipeline.nice`): everything behind
//!   the queue, built by `App::build` on this runtime: batching, chunking,
//!   embedding I/O, COPY encoding, the backfill, the retention reaper, the
//!   telemetry sampler, and the threads those start (the builtin model's
//!   inference threads, the journal's fsync thread inherit the priority).
//!   Its threads run with a higher nice value and under `SCHED_BATCH` (no
//!   wake-up preemption of the acknowledging threads), so the kernel's
//!   scheduler gives a waiting acknowledgement the CPU first.
//!
//! A niced thread only yields when something of higher priority wants the
//! CPU: on an idle machine the pipeline runs as fast as before.

use std::io;

use tokio::runtime::{Builder, Runtime};

use crate::config::Settings;

/// The runtimes of one `convstore serve`.
pub struct Runtimes {
    pub ingress: Runtime,
    /// `None` with `pipeline.nice = 0`: everything on `ingress`, as one
    /// runtime at one priority.
    pub pipeline: Option<Runtime>,
}

/// Builds the runtimes `settings` ask for.
pub fn build(settings: &Settings) -> io::Result<Runtimes> {
    let nice = settings.pipeline.nice;
    if nice == 0 {
        let ingress = Builder::new_multi_thread()
            .thread_name("convstore")
            .enable_all()
            .build()?;
        return Ok(Runtimes {
            ingress,
            pipeline: None,
        });
    }
    let mut ingress = Builder::new_multi_thread();
    if settings.server.ingress_threads > 0 {
        ingress.worker_threads(settings.server.ingress_threads);
    }
    let ingress = ingress
        .thread_name("convstore-ingress")
        .on_thread_start(|| {
            if let Err(e) = shorten_this_threads_slice(INGRESS_SLICE_NS) {
                // Kernels before 6.12 have no per-thread slice for this
                // policy: the priorities alone then separate the paths.
                tracing::debug!(error = %e, "Cannot shorten the scheduler slice of an ingress thread");
            }
        })
        .enable_all()
        .build()?;
    let pipeline = Builder::new_multi_thread()
        .thread_name("convstore-pipeline")
        .on_thread_start(move || {
            if let Err(e) = lower_this_thread(nice) {
                // Not fatal: the daemon works at one priority too.
                tracing::warn!(error = %e, nice, "Cannot lower the priority of a pipeline thread");
            }
        })
        .enable_all()
        .build()?;
    Ok(Runtimes {
        ingress,
        pipeline: Some(pipeline),
    })
}

/// The scheduler slice the acknowledging threads ask for (Linux ≥ 6.12,
/// EEVDF): a thread with a shorter slice gets an earlier virtual deadline,
/// so when it wakes with a request it may preempt a thread in the middle of
/// a longer slice (PostgreSQL inserting into the HNSW index) instead of
/// waiting for that slice to end (3 ms by default). The kernel's minimum.
pub const INGRESS_SLICE_NS: u64 = 100_000;

/// `struct sched_attr` as of Linux 3.14 (`SCHED_ATTR_SIZE_VER0`, 48 bytes):
/// `sched_runtime` is a fair thread's slice since Linux 6.12.
#[repr(C)]
struct SchedAttr {
    size: u32,
    sched_policy: u32,
    sched_flags: u64,
    sched_nice: i32,
    sched_priority: u32,
    sched_runtime: u64,
    sched_deadline: u64,
    sched_period: u64,
}

/// Asks for a scheduler slice of `ns` nanoseconds for the calling thread,
/// keeping its policy (`SCHED_OTHER`) and nice value.
pub fn shorten_this_threads_slice(ns: u64) -> io::Result<()> {
    let (nice, _) = this_thread_priority()?;
    let attr = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        sched_policy: libc::SCHED_OTHER as u32,
        sched_flags: 0,
        sched_nice: nice,
        sched_priority: 0,
        sched_runtime: ns,
        sched_deadline: 0,
        sched_period: 0,
    };
    // SAFETY: sched_setattr(2) on the calling thread (pid 0) reads `attr`,
    // a valid, initialised struct whose `size` says how much to read.
    let rc = unsafe { libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the calling thread the nice value `nice` and the `SCHED_BATCH`
/// policy. Linux keeps both per thread, and `0` names the calling thread;
/// threads it starts inherit them. Lowering one's own priority needs no
/// privilege.
pub fn lower_this_thread(nice: u8) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: plain system calls on the calling thread with a valid,
    // initialised parameter; no memory is shared with the kernel after
    // they return.
    let policy = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
    if policy != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: as above.
    let set = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, libc::c_int::from(nice)) };
    if set != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The calling thread's nice value and whether it runs under
/// `SCHED_BATCH` (tests, the start-up log).
pub fn this_thread_priority() -> io::Result<(i32, bool)> {
    // getpriority may legitimately return -1: errno tells.
    // SAFETY: plain system calls on the calling thread.
    unsafe {
        *libc::__errno_location() = 0;
        let nice = libc::getpriority(libc::PRIO_PROCESS, 0);
        if nice == -1 && *libc::__errno_location() != 0 {
            return Err(io::Error::last_os_error());
        }
        let policy = libc::sched_getscheduler(0);
        if policy < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok((nice, policy == libc::SCHED_BATCH))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lowered_thread_is_niced_and_batch_and_its_children_inherit() {
        let seen = std::thread::spawn(|| {
            lower_this_thread(7).expect("lower");
            let own = this_thread_priority().expect("read");
            let child = std::thread::spawn(|| this_thread_priority().expect("read child"))
                .join()
                .expect("child");
            (own, child)
        })
        .join()
        .expect("thread");
        assert_eq!(seen.0, (7, true));
        assert_eq!(seen.1, (7, true));
        // The test thread itself is untouched.
        let (nice, batch) = this_thread_priority().expect("read");
        assert!(!batch && nice != 7, "{nice} {batch}");
    }

    /// The slice read back: `sched_runtime` of sched_getattr(2).
    fn this_threads_slice() -> u64 {
        let mut attr = SchedAttr {
            size: 0,
            sched_policy: 0,
            sched_flags: 0,
            sched_nice: 0,
            sched_priority: 0,
            sched_runtime: 0,
            sched_deadline: 0,
            sched_period: 0,
        };
        // SAFETY: sched_getattr(2) writes at most `size` bytes into `attr`.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_sched_getattr,
                0,
                &mut attr as *mut SchedAttr,
                std::mem::size_of::<SchedAttr>() as u32,
                0,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        attr.sched_runtime
    }

    /// Linux ≥ 6.12 keeps a fair thread's slice (older kernels take the
    /// call and ignore it).
    fn kernel_has_custom_slices() -> bool {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
        let mut parts = release.trim().split(['.', '-']);
        let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        (major, minor) >= (6, 12)
    }

    #[test]
    fn an_ingress_thread_asks_for_a_short_slice_and_keeps_its_priority() {
        let (slice, priority, before) = std::thread::spawn(|| {
            let before = this_thread_priority().expect("read");
            shorten_this_threads_slice(INGRESS_SLICE_NS).expect("sched_setattr");
            (
                this_threads_slice(),
                this_thread_priority().expect("read"),
                before,
            )
        })
        .join()
        .expect("thread");
        assert_eq!(priority, before);
        if kernel_has_custom_slices() {
            assert_eq!(slice, INGRESS_SLICE_NS);
        }
    }

    #[test]
    fn the_pipeline_runtime_runs_lowered_and_ingress_does_not() {
        let mut settings = Settings::default();
        settings.pipeline.nice = 5;
        let runtimes = build(&settings).expect("runtimes");
        let pipeline = runtimes.pipeline.as_ref().expect("a pipeline runtime");
        let low = pipeline.block_on(async {
            tokio::spawn(async { this_thread_priority().expect("read") })
                .await
                .expect("task")
        });
        assert_eq!(low, (5, true));
        let normal = runtimes.ingress.block_on(async {
            tokio::spawn(async { this_thread_priority().expect("read") })
                .await
                .expect("task")
        });
        assert!(!normal.1 && normal.0 != 5, "{normal:?}");

        settings.pipeline.nice = 0;
        assert!(build(&settings).expect("runtimes").pipeline.is_none());
    }
}
