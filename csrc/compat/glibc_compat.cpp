// glibc symbol-version pinning for the manylinux_2_28 release wheel.
//
// Linked into both kernel libraries (_C.so, _C_cuda.so) when CMake's
// NOLABELS_GLIBC_COMPAT is on (default: Linux x86_64 built against glibc >= 2.29).
//
// Why: a library linked on a newer glibc binds each libc function to its newest
// version. glibc 2.34 moved libpthread/libdl/librt into libc with new versions
// (dlopen@GLIBC_2.34, pthread_create@GLIBC_2.34, sem_wait@GLIBC_2.34, ...), and
// libm gave exp/log/pow new versions in 2.29; a library that needs them does not
// load on glibc 2.28 (AlmaLinux/RHEL 8, the manylinux_2_28 floor that torch's
// own wheels target). The old versions still exist in every newer glibc, with
// the same behaviour, so we bind to those instead:
//
//   * CMakeLists.txt reads the NOLABELS_PIN(symbol, version) lines below and
//     links with -Wl,--wrap=symbol, so every undefined reference to `symbol` in
//     the library (our objects AND libcudart_static.a) becomes `__wrap_symbol`.
//   * NOLABELS_PIN defines `__wrap_symbol` (hidden) as a one-instruction
//     trampoline, `jmp` to `symbol@version` (a .symver-pinned reference, which
//     --wrap leaves alone). A tail jump keeps every argument register, so the
//     trampoline fits any signature, variadic ones included.
//   * CMake also adds DT_NEEDED entries for libpthread.so.0, libdl.so.2,
//     librt.so.1 and libm.so.6: on glibc < 2.34 the pinned symbols live there.
//
// The list holds, for every function of these families whose default version
// on the build machine's glibc (2.36) is newer than 2.28, the newest version
// <= 2.28 (x86_64 version names; they never change). Functions that only exist
// in a version > 2.28 (pthread_cond_clockwait, sem_clockwait, stat@2.33, ...)
// cannot be pinned: a library that calls them fails the auditwheel check in
// scripts/build_wheel.sh and tests/test_wheel_abi.py.
//
// `__libc_single_threaded` (a variable, GLIBC_2.32) is read by libstdc++'s
// inline reference counting (shared_ptr, std::string) when the headers see
// <sys/single_threaded.h>. We define a hidden copy that stays 0 ("maybe
// multi-threaded"), so the library always takes the atomic path: correct in
// every process, and no reference to the glibc 2.32 symbol remains.

#if !defined(__x86_64__) || !defined(__linux__)
#error "csrc/compat/glibc_compat.cpp is for Linux x86_64 only (NOLABELS_GLIBC_COMPAT=OFF elsewhere)"
#endif

#if defined(__CET__) && (__CET__ & 1)
#define NOLABELS_ENDBR "endbr64\n"
#else
#define NOLABELS_ENDBR ""
#endif

// __wrap_<sym>: hidden trampoline to <sym>@<ver>.
#define NOLABELS_PIN(sym, ver)                                   \
  __asm__(".pushsection .text.__wrap_" #sym ",\"ax\",@progbits\n" \
          ".globl __wrap_" #sym "\n"                              \
          ".hidden __wrap_" #sym "\n"                             \
          ".type __wrap_" #sym ", @function\n"                    \
          ".p2align 4\n"                                          \
          "__wrap_" #sym ":\n" NOLABELS_ENDBR                     \
          "jmp nolabels_pinned_" #sym "@PLT\n"                    \
          ".size __wrap_" #sym ", . - __wrap_" #sym "\n"          \
          ".symver nolabels_pinned_" #sym ", " #sym "@" #ver "\n" \
          ".popsection\n");

extern "C" {
__attribute__((visibility("hidden"))) char __libc_single_threaded = 0;
}

// libdl (merged into libc in 2.34): cudart_static loads the driver with these
NOLABELS_PIN(dladdr, GLIBC_2.2.5)
NOLABELS_PIN(dladdr1, GLIBC_2.3.3)
NOLABELS_PIN(dlclose, GLIBC_2.2.5)
NOLABELS_PIN(dlerror, GLIBC_2.2.5)
NOLABELS_PIN(dlinfo, GLIBC_2.3.3)
NOLABELS_PIN(dlmopen, GLIBC_2.3.4)
NOLABELS_PIN(dlopen, GLIBC_2.2.5)
NOLABELS_PIN(dlsym, GLIBC_2.2.5)
NOLABELS_PIN(dlvsym, GLIBC_2.2.5)

// libpthread (merged into libc in 2.34): cudart_static and libstdc++'s inline gthr code
NOLABELS_PIN(__pthread_cleanup_routine, GLIBC_2.3.3)
NOLABELS_PIN(__pthread_key_create, GLIBC_2.2.5)
NOLABELS_PIN(__pthread_register_cancel, GLIBC_2.3.3)
NOLABELS_PIN(__pthread_register_cancel_defer, GLIBC_2.3.3)
NOLABELS_PIN(__pthread_unregister_cancel, GLIBC_2.3.3)
NOLABELS_PIN(__pthread_unregister_cancel_restore, GLIBC_2.3.3)
NOLABELS_PIN(__pthread_unwind_next, GLIBC_2.3.3)
NOLABELS_PIN(_pthread_cleanup_pop, GLIBC_2.2.5)
NOLABELS_PIN(_pthread_cleanup_push, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_getaffinity_np, GLIBC_2.3.4)
NOLABELS_PIN(pthread_attr_getguardsize, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_getstack, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_getstackaddr, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_getstacksize, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_setaffinity_np, GLIBC_2.3.4)
NOLABELS_PIN(pthread_attr_setguardsize, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_setstack, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_setstackaddr, GLIBC_2.2.5)
NOLABELS_PIN(pthread_attr_setstacksize, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrier_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrier_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrier_wait, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrierattr_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrierattr_getpshared, GLIBC_2.3.3)
NOLABELS_PIN(pthread_barrierattr_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_barrierattr_setpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_cancel, GLIBC_2.2.5)
NOLABELS_PIN(pthread_condattr_getclock, GLIBC_2.3.3)
NOLABELS_PIN(pthread_condattr_getpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_condattr_setclock, GLIBC_2.3.3)
NOLABELS_PIN(pthread_condattr_setpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_create, GLIBC_2.2.5)
NOLABELS_PIN(pthread_detach, GLIBC_2.2.5)
NOLABELS_PIN(pthread_getaffinity_np, GLIBC_2.3.4)
NOLABELS_PIN(pthread_getattr_default_np, GLIBC_2.18)
NOLABELS_PIN(pthread_getattr_np, GLIBC_2.2.5)
NOLABELS_PIN(pthread_getconcurrency, GLIBC_2.2.5)
NOLABELS_PIN(pthread_getcpuclockid, GLIBC_2.2.5)
NOLABELS_PIN(pthread_getname_np, GLIBC_2.12)
NOLABELS_PIN(pthread_getspecific, GLIBC_2.2.5)
NOLABELS_PIN(pthread_join, GLIBC_2.2.5)
NOLABELS_PIN(pthread_key_create, GLIBC_2.2.5)
NOLABELS_PIN(pthread_key_delete, GLIBC_2.2.5)
NOLABELS_PIN(pthread_kill, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutex_consistent, GLIBC_2.12)
NOLABELS_PIN(pthread_mutex_getprioceiling, GLIBC_2.4)
NOLABELS_PIN(pthread_mutex_setprioceiling, GLIBC_2.4)
NOLABELS_PIN(pthread_mutex_timedlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutex_trylock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_getprioceiling, GLIBC_2.4)
NOLABELS_PIN(pthread_mutexattr_getprotocol, GLIBC_2.4)
NOLABELS_PIN(pthread_mutexattr_getpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_getrobust, GLIBC_2.12)
NOLABELS_PIN(pthread_mutexattr_gettype, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_setprioceiling, GLIBC_2.4)
NOLABELS_PIN(pthread_mutexattr_setprotocol, GLIBC_2.4)
NOLABELS_PIN(pthread_mutexattr_setpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_mutexattr_setrobust, GLIBC_2.12)
NOLABELS_PIN(pthread_mutexattr_settype, GLIBC_2.2.5)
NOLABELS_PIN(pthread_once, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_rdlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_timedrdlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_timedwrlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_tryrdlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_trywrlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_unlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlock_wrlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_getkind_np, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_getpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_setkind_np, GLIBC_2.2.5)
NOLABELS_PIN(pthread_rwlockattr_setpshared, GLIBC_2.2.5)
NOLABELS_PIN(pthread_setaffinity_np, GLIBC_2.3.4)
NOLABELS_PIN(pthread_setattr_default_np, GLIBC_2.18)
NOLABELS_PIN(pthread_setconcurrency, GLIBC_2.2.5)
NOLABELS_PIN(pthread_setname_np, GLIBC_2.12)
NOLABELS_PIN(pthread_setschedprio, GLIBC_2.3.4)
NOLABELS_PIN(pthread_setspecific, GLIBC_2.2.5)
NOLABELS_PIN(pthread_sigmask, GLIBC_2.2.5)
NOLABELS_PIN(pthread_sigqueue, GLIBC_2.11)
NOLABELS_PIN(pthread_spin_destroy, GLIBC_2.2.5)
NOLABELS_PIN(pthread_spin_init, GLIBC_2.2.5)
NOLABELS_PIN(pthread_spin_lock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_spin_trylock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_spin_unlock, GLIBC_2.2.5)
NOLABELS_PIN(pthread_testcancel, GLIBC_2.2.5)
NOLABELS_PIN(pthread_timedjoin_np, GLIBC_2.3.3)
NOLABELS_PIN(pthread_tryjoin_np, GLIBC_2.3.3)

// semaphores, shared memory, timers (libpthread / librt before 2.34)
NOLABELS_PIN(sem_close, GLIBC_2.2.5)
NOLABELS_PIN(sem_destroy, GLIBC_2.2.5)
NOLABELS_PIN(sem_getvalue, GLIBC_2.2.5)
NOLABELS_PIN(sem_init, GLIBC_2.2.5)
NOLABELS_PIN(sem_open, GLIBC_2.2.5)
NOLABELS_PIN(sem_post, GLIBC_2.2.5)
NOLABELS_PIN(sem_timedwait, GLIBC_2.2.5)
NOLABELS_PIN(sem_trywait, GLIBC_2.2.5)
NOLABELS_PIN(sem_unlink, GLIBC_2.2.5)
NOLABELS_PIN(sem_wait, GLIBC_2.2.5)
NOLABELS_PIN(shm_open, GLIBC_2.2.5)
NOLABELS_PIN(shm_unlink, GLIBC_2.2.5)
NOLABELS_PIN(timer_create, GLIBC_2.3.3)
NOLABELS_PIN(timer_delete, GLIBC_2.3.3)
NOLABELS_PIN(timer_getoverrun, GLIBC_2.3.3)
NOLABELS_PIN(timer_gettime, GLIBC_2.3.3)
NOLABELS_PIN(timer_settime, GLIBC_2.3.3)

// libm: new default versions in 2.29-2.35 (same results, no SVID error wrapper)
NOLABELS_PIN(exp, GLIBC_2.2.5)
NOLABELS_PIN(exp10f, GLIBC_2.2.5)
NOLABELS_PIN(exp2, GLIBC_2.2.5)
NOLABELS_PIN(hypot, GLIBC_2.2.5)
NOLABELS_PIN(hypotf, GLIBC_2.2.5)
NOLABELS_PIN(log, GLIBC_2.2.5)
NOLABELS_PIN(log2, GLIBC_2.2.5)
NOLABELS_PIN(pow, GLIBC_2.2.5)
