using System.Diagnostics;
using DmaBroker.Core;
using DmaBroker.Core.Iommu;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// A device writing its session's memory flat out, on a thread of its own, until the broker
/// refuses it, each write stamped (<see cref="DmaStamps"/>). As one writer's writes land in order,
/// the memory after its last acknowledged write <c>N</c> holds exactly <c>N - slots + 1 … N</c>,
/// slot by slot (<see cref="Expected"/>): a write that landed unacknowledged, or was acknowledged
/// without landing, shows there.
/// </summary>
public sealed class DmaStamper
{
    private readonly DeviceHandle _device;
    private readonly ulong _iova;
    private readonly int _slots;
    private readonly Stopwatch _clock;
    private readonly TaskCompletionSource _first = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private long _applied;

    private DmaStamper(DeviceHandle device, ulong iova, int bytes, Stopwatch clock)
    {
        _device = device;
        _iova = iova;
        _slots = bytes / DmaStamps.Size;
        _clock = clock;
        Stopped = Task.Factory.StartNew(Run, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>Starts writing through <paramref name="device"/> into <c>[iova, iova + bytes)</c>; times are read from <paramref name="clock"/>.</summary>
    public static DmaStamper Start(DeviceHandle device, ulong iova, int bytes, Stopwatch clock) => new(device, iova, bytes, clock);

    /// <summary>Completes once the first write has landed.</summary>
    public Task Running => _first.Task;

    /// <summary>The writes the device acknowledged so far: the last number that landed.</summary>
    public long Applied => Interlocked.Read(ref _applied);

    /// <summary>Completes when the broker refuses a write (an error, or a BLOCKED fault): the last write that landed, when its acknowledgement was read, and the refusal.</summary>
    public Task<(long Last, TimeSpan LastAt, string Refusal)> Stopped { get; }

    /// <summary>What the memory must hold after write <paramref name="last"/>, and nothing after it, landed.</summary>
    public byte[] Expected(long last) => DmaStamps.Expected(last, _slots);

    private (long, TimeSpan, string) Run()
    {
        Span<byte> stamp = stackalloc byte[DmaStamps.Size];
        var at = TimeSpan.Zero;
        for (var n = 1L; ; n++)
        {
            DmaStamps.Stamp(stamp, n);
            string refusal;
            try
            {
                var outcome = _device.DmaWrite(_iova + DmaStamps.Offset(n, _slots), stamp);
                if (outcome.Ok)
                {
                    // Read after the write returned: no earlier than it landed.
                    at = _clock.Elapsed;
                    Interlocked.Exchange(ref _applied, n);
                    _first.TrySetResult();
                    continue;
                }
                // The session's DMA fence (SPEC §16) blocks it, as a detached domain would; any
                // other fault is the test's mistake.
                if (outcome.Reason != FaultReason.Blocked)
                    throw new InvalidOperationException($"write {n} faulted: {outcome.Reason} at 0x{outcome.FaultIova:x}");
                refusal = "BLOCKED (the session's DMA fence)";
            }
            catch (ErrnoException e)
            {
                refusal = $"{e.Errno}: {e.Message}";
            }
            _first.TrySetException(new InvalidOperationException($"write {n} refused: {refusal}"));
            return (n - 1, at, refusal);
        }
    }
}
