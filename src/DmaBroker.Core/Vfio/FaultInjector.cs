using DmaBroker.Core.Devices;
using DmaBroker.Core.Faults;
using DmaBroker.Core.Ownership;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Vfio;

/// <summary>
/// The broker's fault injector (SPEC §14, Kernel.InjectFault / ClearFaults / ListFaults): arms
/// faults on devices, where the models and handles meet them at their hook points, and carries out
/// the two kinds that act at once — SURPRISE_REMOVE through the VFIO driver's surprise removal,
/// LINK_DOWN by cutting the owning session's connection. Every fault stays listed, with how often it
/// fired, until it is cleared. Lives beside <see cref="VfioDriver"/> because both of its acts undo
/// VFIO state (handles, claims, sessions).
/// </summary>
public sealed class FaultInjector(OwnershipTable table, VfioDriver vfio, SessionRegistry sessions, TimeProvider time)
{
    // The fault injector lock (lock 9 of docs/locking.md): guards the list; only a device's fault lock is taken under it.
    private readonly Lock _sync = new();
    private readonly List<(InjectedFault Fault, PciDevice Device)> _faults = [];
    private long _nextId;

    /// <summary>
    /// Injects a fault on the device at <paramref name="address"/> and returns it. A kind that acts
    /// at once has acted when this returns (for LINK_DOWN: the session is released). ENODEV for no
    /// such device; EINVAL for settings the kind or the device does not take (<see cref="FaultSettings.Validate"/>),
    /// or LINK_DOWN of a device no session owns; EBUSY for SURPRISE_REMOVE of a bridge with devices
    /// below it. A refused injection arms nothing.
    /// </summary>
    public async Task<InjectedFault> InjectAsync(PciAddress address, FaultSettings settings)
    {
        var device = table.GetDevice(address);
        settings.Validate(device.Spec.Model);
        // The status an NVMe DEVICE_ERROR completes with by default, written out so ListFaults shows it.
        if (settings is { Kind: FaultKind.DeviceError, Status: 0 } && device.Model is NvmeController)
            settings = settings with { Status = (uint)NvmeStatus.DataTransferError };
        var fault = new InjectedFault((ulong)Interlocked.Increment(ref _nextId), address, settings);
        switch (settings.Kind)
        {
            case FaultKind.SurpriseRemove:
                vfio.SurpriseRemove(address);
                fault.Acted();
                break;
            case FaultKind.LinkDown:
                var owner = OwnerOf(device) ?? throw ErrnoException.Conflict(Errno.EINVAL,
                    $"LINK_DOWN cuts the connection of the session that owns {address}, and none does");
                fault.Acted();
                Record(fault, device);
                await sessions.CutConnectionAsync(owner, $"connection lost: link down injected on {address} (fault {fault.Id})").ConfigureAwait(false);
                return fault;
            default:
                // Armed and listed at once, so a racing Clear finds it either nowhere or in both.
                lock (_sync)
                {
                    device.Model.Faults.Arm(fault, time);
                    _faults.Add((fault, device));
                }
                return fault;
        }
        Record(fault, device);
        return fault;
    }

    /// <summary>
    /// Removes the faults of the device at <paramref name="address"/> (armed or spent; the address may
    /// name a device that is gone), or every fault when it is null; returns how many. ENODEV when the
    /// address names neither a device nor a fault.
    /// </summary>
    public int Clear(PciAddress? address)
    {
        (InjectedFault Fault, PciDevice Device)[] cleared;
        lock (_sync)
        {
            cleared = [.. _faults.Where(f => address is null || f.Fault.Address == address)];
            if (cleared.Length == 0 && address is { } a)
                table.GetDevice(a);
            _faults.RemoveAll(f => address is null || f.Fault.Address == address);
            foreach (var device in cleared.Select(f => f.Device).Distinct())
                device.Model.Faults.Disarm(f => cleared.Any(c => c.Fault == f));
        }
        return cleared.Length;
    }

    /// <summary>Every fault not yet cleared, in injection order.</summary>
    public IReadOnlyList<InjectedFault> List()
    {
        lock (_sync)
            return [.. _faults.Select(f => f.Fault)];
    }

    private void Record(InjectedFault fault, PciDevice device)
    {
        lock (_sync)
            _faults.Add((fault, device));
    }

    private static Session? OwnerOf(PciDevice device)
    {
        lock (device.Group.Sync)
            return device.Group.OwnerKind == OwnerKind.User ? device.Group.Owner : null;
    }
}
