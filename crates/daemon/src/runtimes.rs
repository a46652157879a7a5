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
