using System.Buffers.Binary;
using System.Diagnostics;
using DmaBroker.Core;
using DmaBroker.Core.Vfio;

namespace DmaBroker.Cluster.Tests;

/// <summary>
/// A device writing its session's memory flat out, on a thread of its own, until the broker
/// refuses it: write <c>n</c> (1, 2, 3, …) puts the 8-byte number <c>n</c> into slot
/// <c>n % slots</c> of the mapped range, so the memory itself shows which writes landed. As one
/// writer's writes land in order, the memory after its last acknowledged write <c>N</c> holds
/// exactly <c>N - slots + 1 … N</c>, slot by slot (<see cref="Expected"/>): a write that landed
/// unacknowledged, or was acknowledged without landing, shows there.
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
        _slots = bytes / sizeof(ulong);
        _clock = clock;
        Stopped = Task.Factory.StartNew(Run, CancellationToken.None, TaskCreationOptions.LongRunning, TaskScheduler.Default);
    }

    /// <summary>Starts writing through <paramref name="device"/> into <c>[iova, iova + bytes)</c>; times are read from <paramref name="clock"/>.</summary>
    public static DmaStamper Start(DeviceHandle device, ulong iova, int bytes, Stopwatch clock) => new(device, iova, bytes, clock);

    /// <summary>Completes once the first write has landed.</summary>
    public Task Running => _first.Task;

    /// <summary>The writes the device acknowledged so far: the last number that landed.</summary>
    public long Applied => Interlocked.Read(ref _applied);

    /// <summary>Completes when the broker refuses a write: the last write that landed, when its acknowledgement was read, and the refusal.</summary>
    public Task<(long Last, TimeSpan LastAt, ErrnoException Refusal)> Stopped { get; }

    /// <summary>What the memory must hold after write <paramref name="last"/>, and nothing after it, landed.</summary>
    public byte[] Expected(long last)
    {
        var memory = new byte[_slots * sizeof(ulong)];
        for (var n = Math.Max(1, last - _slots + 1); n <= last; n++)
            BinaryPrimitives.WriteInt64LittleEndian(memory.AsSpan((int)(n % _slots) * sizeof(ulong)), n);
        return memory;
    }

    /// <summary>The last write whose number <paramref name="memory"/> (a copy of the range) holds: the highest.</summary>
    public static long LastIn(ReadOnlySpan<byte> memory)
    {
        var last = 0L;
        for (var i = 0; i + sizeof(ulong) <= memory.Length; i += sizeof(ulong))
            last = Math.Max(last, BinaryPrimitives.ReadInt64LittleEndian(memory[i..]));
        return last;
    }

    private (long, TimeSpan, ErrnoException) Run()
    {
        Span<byte> stamp = stackalloc byte[sizeof(ulong)];
        var at = TimeSpan.Zero;
        for (var n = 1L; ; n++)
        {
            BinaryPrimitives.WriteInt64LittleEndian(stamp, n);
            try
            {
                var outcome = _device.DmaWrite(_iova + (ulong)(n % _slots * sizeof(ulong)), stamp);
                // No fault is expected: a session that ends refuses DMA before it detaches anything.
                if (!outcome.Ok)
                    throw new InvalidOperationException($"write {n} faulted: {outcome.Reason} at 0x{outcome.FaultIova:x}");
            }
            catch (ErrnoException refusal)
            {
                _first.TrySetException(refusal);
                return (n - 1, at, refusal);
            }
            // Read after the write returned: no earlier than it landed.
            at = _clock.Elapsed;
            Interlocked.Exchange(ref _applied, n);
            _first.TrySetResult();
        }
    }
}
