using System.Collections.Concurrent;
using System.Collections.Immutable;
using DmaBroker.Core.Devices;
using DmaBroker.Core.Sessions;
using DmaBroker.Core.Topology;

namespace DmaBroker.Core.Ownership;

/// <summary>
/// The table of devices and IOMMU groups, and the kernel side of DMA ownership: driver binding
/// and hotplug. Lookups are lock-free; each group's state is guarded by that group's lock, so
/// work on different groups never serialises. Structural changes (hotplug) also take one
/// hotplug lock. Lock order: <c>docs/locking.md</c>.
/// </summary>
public sealed class OwnershipTable
{
    private readonly ConcurrentDictionary<PciAddress, PciDevice> _devices = new();
    private readonly ConcurrentDictionary<uint, IommuGroup> _groups = new();
    // Lock 1 of docs/locking.md: the table's shape (which devices and groups exist); taken before any group's lock.
    private readonly Lock _hotplug = new();
    private readonly Dictionary<byte, PciDevice> _bridgeBySecondaryBus = [];
    private readonly HashSet<uint> _pinnedGroupIds;
    private readonly TimeProvider _time;
    private uint _nextGroupId;

    /// <summary>
    /// The table of <paramref name="topology"/>; its device models keep time on <paramref name="time"/>
    /// (the system clock by default), and its ownership changes are decided by <paramref name="store"/>
    /// (this process alone by default).
    /// </summary>
    internal OwnershipTable(TopologyDocument topology, int watchBuffer = 1024, TimeProvider? time = null, IOwnershipStore? store = null)
    {
        _time = time ?? TimeProvider.System;
        Store = store ?? EmbeddedOwnershipStore.Instance;
        _pinnedGroupIds = [.. topology.Functions.Where(f => f.PinnedGroup.HasValue).Select(f => f.PinnedGroup!.Value)];
        foreach (var spec in topology.Functions)
        {
            var device = Insert(spec);
            if (spec.Driver is { } driver)
            {
                device.Group.CheckKernelUse(device, driver);
                Bind(device, driver);
            }
        }
        Journal = new TopologyJournal(new TopologySnapshot(
            1,
            ImmutableSortedDictionary.CreateRange(_groups.Select(g => KeyValuePair.Create(g.Key, g.Value.ToInfo()))),
            ImmutableSortedDictionary.CreateRange(_devices.Select(d => KeyValuePair.Create(d.Key, d.Value.ToInfo())))),
            watchBuffer);
    }

    /// <summary>The revisioned record of this table, for readers and watchers.</summary>
    public TopologyJournal Journal { get; }

    /// <summary>Where ownership changes are decided: this process alone, or a cluster (SPEC §16).</summary>
    public IOwnershipStore Store { get; }

    /// <summary>The device at <paramref name="address"/>; ENODEV (NOT_FOUND) if there is none.</summary>
    public PciDevice GetDevice(PciAddress address) =>
        _devices.TryGetValue(address, out var d) ? d : throw ErrnoException.NoDevice(address);

    /// <summary>The group numbered <paramref name="id"/>; ENOENT (NOT_FOUND) if there is none.</summary>
    public IommuGroup GetGroup(uint id) =>
        _groups.TryGetValue(id, out var g) ? g : throw ErrnoException.NoGroup(id);

    internal IEnumerable<IommuGroup> Groups => _groups.Values;

    /// <summary>Binds a driver (sysfs bind). A DMA-API driver takes a kernel ownership count.</summary>
    public DeviceInfo BindDriver(PciAddress address, string driver)
    {
        Drivers.Validate(driver);
        var device = GetDevice(address);
        var group = device.Group;
        lock (group.Sync)
        {
            CheckPresent(device);
            if (device.Driver is { } bound)
                throw ErrnoException.Busy($"{address} is already bound to {bound}; unbind it first");
            var kernel = !Drivers.ManagesDma(driver);
            if (kernel)
                group.CheckKernelUse(device, driver);
            Store.CommitDriver(group.Id, group.OwnerState, address, null, driver, group.OwnerCount + (kernel ? 1 : 0));
            Bind(device, driver);
            return PublishDevice(device);
        }
    }

    /// <summary>Unbinds the device's driver (sysfs unbind); a DMA-API driver drops its kernel count.</summary>
    public DeviceInfo UnbindDriver(PciAddress address)
    {
        var device = GetDevice(address);
        var group = device.Group;
        lock (group.Sync)
        {
            CheckPresent(device);
            if (device.Driver is null)
                throw ErrnoException.Conflict(Errno.EINVAL, $"{address} has no driver bound");
            if (device.BoundBy is { } s)
                throw ErrnoException.Busy($"{address} is bound by session {s.Id}; it must unbind the device first");
            if (device.OpenHandles > 0)
                throw ErrnoException.Busy($"{address} is open by a user driver");
            // A session of another replica (SPEC §16) may hold the device open there, out of sight.
            if (group.Remote is { } remote && device.DriverManagesDma)
                throw ErrnoException.Busy($"{address}: group {group.Id} is owned by session {remote.SessionId} on replica {remote.Replica}, which may have it open");
            var kernel = !device.DriverManagesDma;
            if (kernel)
                group.CheckKernelUnuse();
            Store.CommitDriver(group.Id, group.OwnerState, address, device.Driver, null, group.OwnerCount - (kernel ? 1 : 0));
            if (kernel)
                group.KernelUnuse();
            device.Driver = null;
            return PublishDevice(device);
        }
    }

    /// <summary>
    /// Hot-adds an endpoint. It joins a group by the §2 rules, or a new one, and that group's
    /// current domain; with a driver, the bind must succeed or nothing is added.
    /// </summary>
    public DeviceInfo AddDevice(PciFunctionSpec spec)
    {
        if (spec.IsBridge || !DeviceModel.EndpointModels.Contains(spec.Model))
            throw ErrnoException.Invalid($"only endpoints can be hot-added, with model {string.Join(", ", DeviceModel.EndpointModels)}; not a {spec.Kind} {ErrnoException.Quote(spec.Model)}");
        if (spec.Driver is not null)
            Drivers.Validate(spec.Driver);
        lock (_hotplug)
        {
            if (_devices.ContainsKey(spec.Address))
                throw ErrnoException.Exists($"{spec.Address} already exists");
            if (spec.Address.Bus != 0 && !_bridgeBySecondaryBus.ContainsKey(spec.Address.Bus))
                throw ErrnoException.NotFound(Errno.ENODEV, $"no bridge leads to bus {spec.Address.Bus:x2}");
            var kernel = spec.Driver is { } d && !Drivers.ManagesDma(d);
            var existing = FindGroupFor(spec);
            if (existing is not null)
            {
                lock (existing.Sync)
                {
                    var probe = new PciDevice(spec, existing, _time);
                    if (kernel)
                        existing.CheckKernelUse(probe, spec.Driver!);
                    Store.CommitHotplug(spec, existing.Id, existing.OwnerState, added: true, spec.Driver, existing.OwnerCount + (kernel ? 1 : 0));
                    return Plug(spec, existing);
                }
            }
            var id = NextGroupId(spec.PinnedGroup);
            Store.CommitHotplug(spec, id, default, added: true, spec.Driver, kernel ? 1 : 0);
            return Plug(spec, NewGroup(id, spec.PinnedGroup.HasValue));
        }
    }

    /// <summary>
    /// A hot-add or hot-removal another replica made (SPEC §16): <paramref name="added"/> joins group
    /// <paramref name="groupId"/> as that replica placed it (the group of that id, or a new one); or
    /// (null) the device at <paramref name="address"/> goes. <paramref name="isNewer"/> is asked under
    /// the hotplug lock, as in <see cref="ApplyRemote"/>, and <paramref name="applied"/> told there
    /// once the change is in the table: a change that fails halfway is not told, so the store can
    /// bring it again. A device that a session of this replica holds was removed by surprise there
    /// (SPEC §14 SURPRISE_REMOVE: a planned removal of it is refused): it goes here as it would have
    /// gone by surprise here. A device added into a group a user owns here joins it as a local hot-add
    /// does, but without its DMA-API driver, which never binds there (§3, §10.2): the report is older
    /// than the claim, and the driver's own record says what it is now. A device that exists already,
    /// one that is gone already, or a bridge with devices below it, is left as it is.
    /// </summary>
    public void ApplyRemoteHotplug(PciAddress address, PciFunctionSpec? added, uint groupId, Func<bool> isNewer, Action applied)
    {
        ArgumentNullException.ThrowIfNull(isNewer);
        ArgumentNullException.ThrowIfNull(applied);
        lock (_hotplug)
        {
            if (!isNewer())
                return;
            var present = _devices.TryGetValue(address, out var device);
            if (added is not null)
            {
                if (!present && (address.Bus == 0 || _bridgeBySecondaryBus.ContainsKey(address.Bus)))
                    Plug(added, _groups.GetValueOrDefault(groupId) ?? NewGroup(groupId, _pinnedGroupIds.Contains(groupId)));
            }
            else if (device is not null && !(device.Spec.SecondaryBus is { } bus && _devices.Keys.Any(a => a.Bus == bus)))
            {
                lock (device.Group.Sync)
                {
                    if (device.Group.Owner is not null || device.OpenHandles > 0)
                        DetachRemoved?.Invoke(device);
                    Unplug(device);
                }
            }
            applied();
        }
    }

    // Under the hotplug lock: the device joins `group` (new or existing), with its driver. A local
    // hot-add has checked that a DMA-API driver may bind (not into a user-owned group); another
    // replica's joins a group a user owns here without it.
    private DeviceInfo Plug(PciFunctionSpec spec, IommuGroup group)
    {
        lock (group.Sync)
        {
            var device = Insert(spec, group);
            if (spec.Driver is { } driver && (Drivers.ManagesDma(driver) || group.OwnerKind != OwnerKind.User))
                Bind(device, driver);
            var info = device.ToInfo();
            Journal.Publish(new DeviceChanged(info), new GroupChanged(device.Group.ToInfo()));
            return info;
        }
    }

    /// <summary>Hot-removes a device; refused while its group is user-owned or devices sit below it.</summary>
    public void RemoveDevice(PciAddress address) => Remove(address, detach: null);

    /// <summary>
    /// A surprise removal (SPEC §14 SURPRISE_REMOVE): the device goes even while its group is
    /// user-owned. <paramref name="detach"/> first lets go of what users hold of it, under the
    /// hotplug lock and the group's lock; a bridge with devices below it is still refused (EBUSY).
    /// </summary>
    internal void SurpriseRemove(PciAddress address, Action<PciDevice> detach) => Remove(address, detach);

    /// <summary>
    /// What a surprise removal lets go of before the device goes (the VFIO side's handles and
    /// claims on it); called under the hotplug lock and the group's lock.
    /// </summary>
    internal Action<PciDevice>? DetachRemoved { get; set; }

    private void Remove(PciAddress address, Action<PciDevice>? detach)
    {
        lock (_hotplug)
        {
            var device = GetDevice(address);
            if (device.Spec.SecondaryBus is { } bus && _devices.Keys.Any(a => a.Bus == bus))
                throw ErrnoException.Busy($"{address} is a bridge with devices below it");
            var group = device.Group;
            lock (group.Sync)
            {
                if (detach is null && group.OwnerKind == OwnerKind.User)
                    throw ErrnoException.Busy($"{address}: group {group.Id} is {group.Describe()}");
                var kernel = device.Driver is not null && !device.DriverManagesDma;
                if (kernel)
                    group.CheckKernelUnuse();
                Store.CommitHotplug(device.Spec, group.Id, group.OwnerState, added: false, device.Driver, group.OwnerCount - (kernel ? 1 : 0));
                detach?.Invoke(device);
                Unplug(device);
            }
        }
    }

    // Under the hotplug lock and the group's: the device leaves the table, and its group with it if it was the last.
    private void Unplug(PciDevice device)
    {
        var group = device.Group;
        var address = device.Address;
        // A removal here was checked (CheckKernelUnuse); one from another replica may come before
        // its group's count does, and takes the count as it finds it.
        if (device.Driver is not null && !device.DriverManagesDma && group.OwnerKind == OwnerKind.Kernel)
            group.KernelUnuse();
        device.Driver = null;
        device.Removed = true;
        group.Devices.Remove(device);
        _devices.TryRemove(address, out _);
        if (device.Spec.SecondaryBus is { } secondary)
            _bridgeBySecondaryBus.Remove(secondary);
        if (group.Devices.Count == 0)
        {
            group.Removed = true;
            _groups.TryRemove(group.Id, out _);
            Journal.Publish(new DeviceRemoved(address), new GroupRemoved(group.Id));
        }
        else
        {
            Journal.Publish(new DeviceRemoved(address), new GroupChanged(group.ToInfo()));
        }
    }

    /// <summary>
    /// Takes the cluster store's word for a group no session of this replica owns (see
    /// <see cref="IommuGroup.ApplyRemote"/>) and publishes it. Returns the session of this replica
    /// that owns the group instead, which has lost its lease and must be fenced; null otherwise.
    /// <paramref name="isNewer"/> is asked under the group's lock, where the store's own commits
    /// for the group run: false skips a report older than what the store already wrote or saw.
    /// <paramref name="applied"/> is told, under the lock, that the report was taken; a report
    /// refused because a session of this replica owns the group is not, so the store can bring it
    /// again once that session has ended. An unknown group is ignored (it cannot be owned).
    /// </summary>
    public Session? ApplyRemote(uint groupId, Func<bool> isNewer, Action applied, RemoteOwner? owner, int count, ulong generation)
    {
        ArgumentNullException.ThrowIfNull(isNewer);
        ArgumentNullException.ThrowIfNull(applied);
        if (!_groups.TryGetValue(groupId, out var group))
            return null;
        lock (group.Sync)
        {
            if (group.Removed || !isNewer())
                return null;
            var before = group.ToInfo();
            if (!group.ApplyRemote(owner, count, generation))
                return group.Owner;
            applied();
            if (group.ToInfo() is var after && before with { Devices = after.Devices } != after)
                Journal.Publish(new GroupChanged(after));
            return null;
        }
    }

    /// <summary>
    /// Another replica's driver bind or unbind (SPEC §16): <paramref name="address"/>'s driver is now
    /// <paramref name="driver"/> (null: none). Only the driver changes here; the group's kernel count
    /// comes with its owner, through <see cref="ApplyRemote"/>. <paramref name="isNewer"/> is asked
    /// under the group's lock, and <paramref name="applied"/> told there once the driver is in the
    /// table. A DMA-API driver for a device of a group a user owns here is not bound (§3, §10.2: the
    /// report is older than the claim) nor told applied, as <see cref="ApplyRemote"/> leaves a report
    /// refused for the group's owner here. An unknown device is ignored.
    /// </summary>
    public void ApplyRemoteDriver(PciAddress address, string? driver, Func<bool> isNewer, Action applied)
    {
        ArgumentNullException.ThrowIfNull(isNewer);
        ArgumentNullException.ThrowIfNull(applied);
        if (!_devices.TryGetValue(address, out var device))
            return;
        lock (device.Group.Sync)
        {
            if (device.Removed || !isNewer())
                return;
            if (driver is not null && !Drivers.ManagesDma(driver) && device.Group.OwnerKind == OwnerKind.User)
                return;
            if (device.Driver != driver)
            {
                device.Driver = driver;
                PublishDevice(device);
            }
            applied();
        }
    }

    /// <summary>
    /// Runs <paramref name="action"/> under group <paramref name="groupId"/>'s lock with the group's
    /// owner as this table holds it, where the store's own commits for the group run: a cluster store
    /// brings what it recorded back in line with the table there (SPEC §16), serialised with the
    /// group's claims and releases. False, running nothing, for a group that does not exist.
    /// </summary>
    public bool WithOwner(uint groupId, Action<GroupOwner> action)
    {
        ArgumentNullException.ThrowIfNull(action);
        if (!_groups.TryGetValue(groupId, out var group))
            return false;
        lock (group.Sync)
        {
            if (group.Removed)
                return false;
            action(group.OwnerState);
            return true;
        }
    }

    /// <summary>Publishes a group's current state; call under its lock.</summary>
    internal void PublishGroup(IommuGroup group) => Journal.Publish(new GroupChanged(group.ToInfo()));

    private DeviceInfo PublishDevice(PciDevice device)
    {
        var info = device.ToInfo();
        Journal.Publish(new DeviceChanged(info), new GroupChanged(device.Group.ToInfo()));
        return info;
    }

    internal static void CheckPresent(PciDevice device)
    {
        if (device.Removed)
            throw ErrnoException.NoDevice(device.Address);
    }

    internal static void CheckPresent(IommuGroup group)
    {
        if (group.Removed)
            throw ErrnoException.NoGroup(group.Id);
    }

    private static void Bind(PciDevice device, string driver)
    {
        if (!Drivers.ManagesDma(driver))
            device.Group.KernelUse();
        device.Driver = driver;
    }

    private PciDevice Insert(PciFunctionSpec spec, IommuGroup? group = null)
    {
        group ??= FindGroupFor(spec) ?? NewGroup(spec.PinnedGroup);
        var device = new PciDevice(spec, group, _time) { Parent = ParentOf(spec.Address) };
        var at = group.Devices.FindIndex(d => d.Address.CompareTo(spec.Address) > 0);
        group.Devices.Insert(at < 0 ? group.Devices.Count : at, device);
        _devices[spec.Address] = device;
        if (spec.SecondaryBus is { } bus)
            _bridgeBySecondaryBus[bus] = device;
        return device;
    }

    private IommuGroup NewGroup(uint? pinned) => NewGroup(NextGroupId(pinned), pinned.HasValue);

    // The id a new group would get: the pinned one, or the next free one (not taken by this call).
    private uint NextGroupId(uint? pinned)
    {
        if (pinned is { } p)
            return p;
        while (_pinnedGroupIds.Contains(_nextGroupId) || _groups.ContainsKey(_nextGroupId))
            _nextGroupId++;
        return _nextGroupId;
    }

    // A group's id is never handed out again, even once the group is gone (unless a topology pins it).
    private IommuGroup NewGroup(uint id, bool pinned)
    {
        if (!pinned)
            _nextGroupId = Math.Max(_nextGroupId, id + 1);
        return _groups.GetOrAdd(id, static (i, store) => new IommuGroup(i, store), Store);
    }

    /// <summary>
    /// The existing group a new function must join (SPEC §2), or null for a group of its own:
    /// anything below a switch downstream port without ACS shares that port's group; such ports
    /// share one group with each other; a function without ACS shares its slot siblings' group.
    /// </summary>
    private IommuGroup? FindGroupFor(PciFunctionSpec spec)
    {
        if (spec.PinnedGroup is { } pinned)
            return _groups.GetValueOrDefault(pinned);
        for (var bridge = ParentOf(spec.Address); bridge is not null; bridge = ParentOf(bridge.Address))
        {
            if (bridge.Spec.Kind == PciNodeKind.SwitchDownstream && !bridge.Spec.Acs)
                return bridge.Group;
        }
        if (spec.Acs)
            return null;
        foreach (var other in _devices.Values)
        {
            if (other.Spec.Acs || other.Address.Bus != spec.Address.Bus || other.Address.Domain != spec.Address.Domain)
                continue;
            if (spec.Kind == PciNodeKind.SwitchDownstream && other.Spec.Kind == PciNodeKind.SwitchDownstream)
                return other.Group;
            if (spec.Kind == PciNodeKind.Endpoint && other.Spec.Kind == PciNodeKind.Endpoint && other.Address.Slot == spec.Address.Slot)
                return other.Group;
        }
        return null;
    }

    private PciDevice? ParentOf(PciAddress address) =>
        address.Bus == 0 ? null : _bridgeBySecondaryBus.GetValueOrDefault(address.Bus);
}
