using System.Collections.Concurrent;
using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// The device's MSI-X vectors as the broker delivers them on the session's event stream: one
/// pending bit per vector (as the MSI-X Pending Bit Array), set by an interrupt and cleared by the
/// waiter it wakes. Interrupts only say "look at your completion queue": several coalesce into one
/// pending bit, and the queue's phase tags tell what is new. IOMMU faults the broker reports for
/// the device are kept in <see cref="Faults"/>, so a failed command can say what the IOMMU saw.
/// </summary>
public sealed class MsixVectors
{
    private readonly Lock _lock = new();
    private readonly Dictionary<uint, TaskCompletionSource> _pending = [];
    private readonly ConcurrentQueue<Fault> _faults = new();
    private Exception? _ended;

    private MsixVectors(BrokerSession session, VfioDevice device, DmaChannel dma)
    {
        // Both end by themselves when the session, or the DMA channel, does.
        _ = PumpAsync(session, device);
        // The DMA stream carries the same interrupts; this driver takes them from the session's
        // events (where the faults come too), so the stream's copies are only drained.
        _ = DrainAsync(dma);
    }

    /// <summary>The faults the IOMMU reported for the device so far, oldest first.</summary>
    public IReadOnlyCollection<Fault> Faults => _faults;

    /// <summary>Starts listening to the session's events for <paramref name="device"/>; it stops when the session ends.</summary>
    public static MsixVectors Listen(BrokerSession session, VfioDevice device, DmaChannel dma) => new(session, device, dma);

    /// <summary>Waits until <paramref name="vector"/> is pending, then clears it; fails when the session ends or after <paramref name="timeout"/>.</summary>
    public async Task WaitAsync(uint vector, TimeSpan timeout, CancellationToken cancellationToken = default)
    {
        Task pending;
        lock (_lock)
            pending = PendingBit(vector).Task;
        try
        {
            await pending.WaitAsync(timeout, cancellationToken);
        }
        catch (TimeoutException)
        {
            throw new TimeoutException($"no interrupt on MSI-X vector {vector} within {timeout.TotalSeconds:F0} s");
        }
        lock (_lock)
        {
            if (_ended is null && _pending[vector].Task == pending)
                _pending[vector] = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        }
    }

    private TaskCompletionSource PendingBit(uint vector)
    {
        if (!_pending.TryGetValue(vector, out var bit))
        {
            bit = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            if (_ended is not null)
                bit.SetException(_ended);
            _pending[vector] = bit;
        }
        return bit;
    }

    private async Task PumpAsync(BrokerSession session, VfioDevice device)
    {
        await foreach (var ev in session.Events.ReadAllAsync())
        {
            if (ev.Interrupt is { } interrupt && interrupt.Handle == device.Handle)
            {
                lock (_lock)
                    PendingBit(interrupt.Vector).TrySetResult();
            }
            else if (ev.Fault is { } fault && fault.Address == device.Address)
            {
                _faults.Enqueue(fault);
            }
        }
        var ended = new InvalidOperationException($"session {session.Id} ended: {await session.Ended}");
        lock (_lock)
        {
            _ended = ended;
            foreach (var bit in _pending.Values)
                bit.TrySetException(ended);
        }
    }

    private static async Task DrainAsync(DmaChannel dma)
    {
        await foreach (var _ in dma.Interrupts.ReadAllAsync())
        {
        }
    }
}
