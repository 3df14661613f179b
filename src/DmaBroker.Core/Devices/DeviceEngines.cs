using System.Collections.Concurrent;
using System.Runtime.InteropServices;

namespace DmaBroker.Core.Devices;

/// <summary>
/// The threads on which simulated devices do their heavy work (an NVMe controller running the
/// commands a doorbell write posted, and the DMA they do), below the control plane. Real hardware
/// takes no host CPU to do DMA; a simulated device takes the broker's. On Linux the threads run at
/// a lower priority (a nice value, <see cref="BrokerOptions.DeviceNice"/>), so a control call
/// (UnmapDma, a claim, a session's ping) preempts them as soon as it is woken rather than waiting
/// out their time slices. An unprivileged process can lower a thread's priority but not raise it
/// back (RLIMIT_NICE), so the devices get threads of their own; they start on first use.
/// </summary>
/// <remarks>
/// Work runs in the order it was posted, on whichever thread is free: two items posted one after
/// the other may overlap. Callers that need an order (one doorbell's commands) await each item.
/// Work must not block on other device work.
/// </remarks>
public sealed partial class DeviceEngines : IDisposable
{
    private readonly BlockingCollection<Action> _queue = [];
    private readonly int _threads;
    private readonly int _nice;
    private int _started;
    private int _appliedNice;
    private long _ran;

    /// <summary><paramref name="threads"/> engine threads at nice <paramref name="nice"/> (0: the broker's own priority; up to 19).</summary>
    public DeviceEngines(int threads, int nice)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(threads, 1);
        ArgumentOutOfRangeException.ThrowIfLessThan(nice, 0);
        ArgumentOutOfRangeException.ThrowIfGreaterThan(nice, 19);
        _threads = threads;
        _nice = nice;
    }

    /// <summary>How many threads run device work.</summary>
    public int Threads => _threads;

    /// <summary>
    /// The nice value the threads run at, once started: the one asked for, or 0 where it could not be
    /// set (not Linux, or setpriority refused).
    /// </summary>
    public int Nice => Volatile.Read(ref _appliedNice);

    /// <summary>How many pieces of work have run to their end (or their exception) on the engines.</summary>
    public long Ran => Interlocked.Read(ref _ran);

    /// <summary>Runs <paramref name="work"/> on an engine thread; the task completes (on the thread pool) with its result or exception.</summary>
    public Task<T> RunAsync<T>(Func<T> work)
    {
        ArgumentNullException.ThrowIfNull(work);
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        Post(() =>
        {
            T result;
            try
            {
                result = work();
            }
            catch (Exception e)
            {
                Interlocked.Increment(ref _ran);
                done.TrySetException(e);
                return;
            }
            // Counted before its caller can see it done.
            Interlocked.Increment(ref _ran);
            done.TrySetResult(result);
        });
        return done.Task;
    }

    /// <summary>Runs <paramref name="work"/> on an engine thread; the task completes (on the thread pool) when it has, or with its exception.</summary>
    public Task RunAsync(Action work)
    {
        ArgumentNullException.ThrowIfNull(work);
        return RunAsync(() =>
        {
            work();
            return true;
        });
    }

    private void Post(Action work)
    {
        if (Volatile.Read(ref _started) == 0 && Interlocked.Exchange(ref _started, 1) == 0)
            Start();
        try
        {
            _queue.Add(work);
        }
        catch (InvalidOperationException)
        {
            // CompleteAdding: the broker is being disposed.
            throw new ObjectDisposedException(nameof(DeviceEngines));
        }
    }

    private void Start()
    {
        using var ready = new CountdownEvent(_threads);
        for (var i = 0; i < _threads; i++)
        {
            new Thread(() => Run(ready))
            {
                IsBackground = true,
                Name = $"device engine {i}",
            }.Start();
        }
        // So that Nice is known once the first work is posted.
        ready.Wait();
    }

    private void Run(CountdownEvent ready)
    {
        Volatile.Write(ref _appliedNice, LowerPriority(_nice) ? _nice : 0);
        ready.Signal();
        try
        {
            foreach (var work in _queue.GetConsumingEnumerable())
                work();
        }
        catch (ObjectDisposedException)
        {
            // Disposed while waiting: the broker is gone.
        }
    }

    // setpriority(PRIO_PROCESS, tid, nice) sets one thread's nice value on Linux (threads are tasks).
    private static bool LowerPriority(int nice)
    {
        if (nice == 0 || !OperatingSystem.IsLinux())
            return nice == 0;
        try
        {
            return SetPriority(0, GetTid(), nice) == 0;
        }
        catch (Exception e) when (e is DllNotFoundException or EntryPointNotFoundException)
        {
            return false;
        }
    }

    [LibraryImport("libc", EntryPoint = "setpriority", SetLastError = true)]
    private static partial int SetPriority(int which, int who, int prio);

    [LibraryImport("libc", EntryPoint = "gettid")]
    private static partial int GetTid();

    /// <summary>Stops taking work; the threads end once what was posted has run.</summary>
    public void Dispose() => _queue.CompleteAdding();
}
