//! Container cpu and memory limits through cgroup v2, where the machine has it: a
//! `capstan` group under the unified hierarchy, one child group per container run with
//! `cpu.max` and `memory.max` from the container's `resources.limits`, which the
//! container's process joins before it executes its command.
//!
//! Machines without cgroup v2's cpu and memory controllers (cgroup v1, or a container
//! that was not delegated them) run containers without limits; the agent says so once.

use std::ffi::CString;
use std::path::{Path, PathBuf};

use capstan_proto::objects::{Container, RESOURCE_CPU, RESOURCE_MEMORY};

/// The CFS period `cpu.max` quotas are written against, in microseconds (the kernel's
/// default).
const CPU_PERIOD_US: i64 = 100_000;

/// Where the unified hierarchy is usually mounted: on its own, or beside v1 (hybrid).
pub const MOUNTS: [&str; 2] = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"];

#[derive(Debug)]
pub struct Cgroups {
    /// `<mount>/capstan`.
    root: PathBuf,
}

/// A container's limits, as cgroup v2 files take them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Limits {
    /// `cpu.max`: quota and period in microseconds.
    pub cpu_max: Option<String>,
    /// `memory.max`: bytes.
    pub memory_max: Option<String>,
}

impl Limits {
    pub fn of(container: &Container) -> Limits {
        let limits = &container.resources.limits;
        let cpu = limits.get(RESOURCE_CPU).and_then(|q| q.milli_value().ok()).filter(|m| *m > 0);
        let memory = limits.get(RESOURCE_MEMORY).and_then(|q| q.value().ok()).filter(|b| *b > 0);
        Limits {
            cpu_max: cpu
                .map(|millis| format!("{} {CPU_PERIOD_US}", (millis.saturating_mul(CPU_PERIOD_US) / 1000).max(1000))),
            memory_max: memory.map(|bytes| bytes.to_string()),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.cpu_max.is_none() && self.memory_max.is_none()
    }
}

impl Cgroups {
    /// The first of `mounts` whose cgroup v2 hierarchy offers the cpu and memory
    /// controllers, with a `capstan` group made there and both controllers delegated to
    /// its children; None where there is none.
    pub fn detect(mounts: &[&Path]) -> Option<Cgroups> {
        mounts.iter().find_map(|mount| {
            let controllers = std::fs::read_to_string(mount.join("cgroup.controllers")).ok()?;
            let offered: Vec<&str> = controllers.split_whitespace().collect();
            if !offered.contains(&"cpu") || !offered.contains(&"memory") {
                return None;
            }
            let root = mount.join("capstan");
            std::fs::create_dir_all(&root).ok()?;
            for dir in [*mount, root.as_path()] {
                std::fs::write(dir.join("cgroup.subtree_control"), "+cpu +memory").ok()?;
            }
            Some(Cgroups { root })
        })
    }

    /// Makes the group of one container run and writes its limits; returns the path of
    /// its `cgroup.procs`, which the container's process writes itself into.
    pub fn create(&self, name: &str, limits: &Limits) -> std::io::Result<PathBuf> {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir)?;
        if let Some(cpu) = &limits.cpu_max {
            std::fs::write(dir.join("cpu.max"), cpu)?;
        }
        if let Some(memory) = &limits.memory_max {
            std::fs::write(dir.join("memory.max"), memory)?;
        }
        Ok(dir.join("cgroup.procs"))
    }

    /// Removes a container run's group once its processes are gone.
    pub fn remove(&self, name: &str) {
        let _ = std::fs::remove_dir(self.root.join(name));
    }
}

/// Moves the calling process into the group whose `cgroup.procs` is `procs`. Runs in the
/// child between fork and exec, so it only makes system calls (no allocation).
pub fn join(procs: &CString) -> std::io::Result<()> {
    // SAFETY: open/write/close on a valid C string and a stack buffer; async-signal-safe.
    unsafe {
        let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // "0" means the writing process itself.
        let written = libc::write(fd, b"0".as_ptr().cast(), 1);
        libc::close(fd);
        if written != 1 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use capstan_proto::objects::Quantity;

    use super::*;

    fn hierarchy(controllers: &str) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("cgroup.controllers"), controllers).unwrap();
        dir
    }

    #[test]
    fn limits_become_cgroup_files() {
        let mut container = Container::default();
        container.resources.limits.insert("cpu".into(), Quantity::new("500m"));
        container.resources.limits.insert("memory".into(), Quantity::new("128Mi"));
        let limits = Limits::of(&container);
        assert_eq!(limits.cpu_max.as_deref(), Some("50000 100000"));
        assert_eq!(limits.memory_max.as_deref(), Some("134217728"));
        assert!(Limits::of(&Container::default()).is_empty());

        // A hierarchy laid out as cgroupfs lays it out (the files the kernel would make
        // in a new group are made by the writes here).
        let tree = hierarchy("cpuset cpu io memory pids\n");
        let cgroups = Cgroups::detect(&[tree.path()]).expect("cpu and memory are offered");
        assert_eq!(std::fs::read_to_string(tree.path().join("cgroup.subtree_control")).unwrap(), "+cpu +memory");
        let procs = cgroups.create("uid-c-1", &limits).unwrap();
        let group = tree.path().join("capstan/uid-c-1");
        assert_eq!(procs, group.join("cgroup.procs"));
        assert_eq!(std::fs::read_to_string(group.join("cpu.max")).unwrap(), "50000 100000");
        assert_eq!(std::fs::read_to_string(group.join("memory.max")).unwrap(), "134217728");
    }

    #[test]
    fn without_cpu_and_memory_controllers_there_are_no_limits() {
        let v1_like = hierarchy("hugetlb\n");
        let missing = tempfile::tempdir().unwrap();
        assert!(Cgroups::detect(&[v1_like.path(), missing.path()]).is_none());
    }
}
