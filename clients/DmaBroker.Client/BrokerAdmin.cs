using DmaBroker.Protocol.V1;

namespace DmaBroker.Client;

/// <summary>
/// A PCI endpoint function to hot-add with <see cref="BrokerAdmin.AddDeviceAsync"/>.
/// </summary>
/// <param name="Address">Its address, "DDDD:BB:DD.F"; a bridge must already lead to its bus.</param>
/// <param name="Model">The device model: "edu", "nvme", "nic", "gpu" or "audio" (bridges cannot be hot-added).</param>
public sealed record HotplugDevice(string Address, string Model)
{
    /// <summary>The PCI vendor id (16 bits).</summary>
    public uint VendorId { get; init; }

    /// <summary>The PCI device id (16 bits).</summary>
    public uint DeviceId { get; init; }

    /// <summary>The 24-bit class code: base class, sub class, programming interface.</summary>
    public uint ClassCode { get; init; }

    /// <summary>A driver to bind once added, as <see cref="BrokerAdmin.BindDriverAsync"/> would; null leaves it unbound.</summary>
    public string? Driver { get; init; }

    /// <summary>Whether the function has ACS; one without it shares a group with its sibling functions.</summary>
    public bool Acs { get; init; }
}

/// <summary>
/// A fault to inject with <see cref="BrokerAdmin.InjectFaultAsync"/> (SPEC §14). Only the settings
/// the kind uses may be given; the broker refuses the rest (EINVAL). kernel.proto's
/// <c>FaultKind</c> says what each kind does.
/// </summary>
/// <param name="Address">The device, "DDDD:BB:DD.F".</param>
/// <param name="Kind">What the fault does.</param>
public sealed record FaultInjection(string Address, FaultKind Kind)
{
    /// <summary>How many matching events fire before the fault is spent; 0 = until cleared.</summary>
    public uint Count { get; init; }

    /// <summary>DELAY_INTERRUPT's lateness, SLOW_RESET's duration (1 ms to 10 min); zero for the other kinds.</summary>
    public TimeSpan Delay { get; init; }

    /// <summary>DEVICE_ERROR on nvme: the 15-bit NVMe Status Field to complete with; 0 = Data Transfer Error.</summary>
    public uint Status { get; init; }

    /// <summary>The share of matching events that fire, 1 to 100 (the default, 100: every one).</summary>
    public uint ProbabilityPercent { get; init; } = 100;

    /// <summary>The seed of the draws behind <see cref="ProbabilityPercent"/>: the same seed replays the same firings.</summary>
    public ulong Seed { get; init; }

    /// <summary>DEVICE_ERROR on nvme: only I/O commands with this opcode; null = any command.</summary>
    public uint? Opcode { get; init; }

    /// <summary>DEVICE_ERROR on nvme: only Reads and Writes that overlap [LbaStart, LbaStart + LbaCount).</summary>
    public ulong LbaStart { get; init; }

    /// <summary>The LBAs of that range; 0 = no LBA filter.</summary>
    public ulong LbaCount { get; init; }

    internal InjectFaultRequest ToRequest()
    {
        var request = new InjectFaultRequest
        {
            Address = Address,
            Kind = Kind,
            Count = Count,
            DelayMs = (uint)Math.Clamp(Delay.TotalMilliseconds, 0, uint.MaxValue),
            Status = Status,
            ProbabilityPercent = ProbabilityPercent,
            Seed = Seed,
            LbaStart = LbaStart,
            LbaCount = LbaCount,
        };
        if (Opcode is { } opcode)
            request.Opcode = opcode;
        return request;
    }
}

/// <summary>
/// The kernel and operator side of a broker (SPEC §7): driver binding, hotplug, session revocation,
/// live counts and fault injection (SPEC §14). Reached as <see cref="BrokerClient.Admin"/>. Rejections throw
/// <see cref="BrokerException"/> with the errno Linux would give.
/// </summary>
public sealed class BrokerAdmin
{
    private readonly Kernel.KernelClient _kernel;

    internal BrokerAdmin(Kernel.KernelClient kernel) => _kernel = kernel;

    /// <summary>
    /// Binds a driver, as writing the address to <c>/sys/bus/pci/drivers/&lt;driver&gt;/bind</c> does,
    /// and returns the device as bound. A driver other than vfio-pci, pci-stub or pcieport uses the
    /// kernel DMA API and takes a kernel ownership count on the group: EBUSY if the group is
    /// user-owned (or the device already has a driver), ENODEV for no such device.
    /// </summary>
    public Task<Device> BindDriverAsync(string address, string driver, CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => _kernel.BindDriverAsync(new BindDriverRequest { Address = address, Driver = driver }, cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>
    /// Unbinds the device's driver and returns the device. EINVAL if none is bound; EBUSY while a
    /// session has the device bound or open through VFIO.
    /// </summary>
    public Task<Device> UnbindDriverAsync(string address, CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => _kernel.UnbindDriverAsync(new UnbindDriverRequest { Address = address }, cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>
    /// Hot-adds an endpoint function and returns it: it joins a group by the rules of SPEC §2 (else
    /// a new one) and that group's current domain. EEXIST if the address is taken; ENODEV if no
    /// bridge leads to its bus; EBUSY if its driver cannot bind (then it is not added).
    /// </summary>
    public Task<Device> AddDeviceAsync(HotplugDevice device, CancellationToken cancellationToken = default)
    {
        var request = new AddDeviceRequest
        {
            Address = device.Address,
            Model = device.Model,
            VendorId = device.VendorId,
            DeviceId = device.DeviceId,
            ClassCode = device.ClassCode,
            Driver = device.Driver ?? "",
            Acs = device.Acs,
        };
        return BrokerException.Wrap(() => _kernel.AddDeviceAsync(request, cancellationToken: cancellationToken).ResponseAsync);
    }

    /// <summary>
    /// Hot-removes a device (its driver is unbound first). ENODEV for no such device; EBUSY while
    /// its group is user-owned, or for a bridge with devices below it.
    /// </summary>
    public Task RemoveDeviceAsync(string address, CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => _kernel.RemoveDeviceAsync(new RemoveDeviceRequest { Address = address }, cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>
    /// Ends a session as if its stream had died: it is told <paramref name="reason"/> (by default
    /// "revoked by admin"), and the broker releases everything it held. ENOENT for no live session with that id.
    /// </summary>
    public Task RevokeSessionAsync(ulong sessionId, string? reason = null, CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => _kernel.RevokeSessionAsync(new RevokeSessionRequest { SessionId = sessionId, Reason = reason ?? "" }, cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>
    /// Injects a fault (SPEC §14) and returns its id. SURPRISE_REMOVE and LINK_DOWN have acted when
    /// this returns. ENODEV for no such device; EINVAL for a kind or setting the device does not
    /// take, or LINK_DOWN of a device no session owns; EBUSY to surprise-remove a bridge with devices below.
    /// </summary>
    public async Task<ulong> InjectFaultAsync(FaultInjection fault, CancellationToken cancellationToken = default) =>
        (await BrokerException.Wrap(() => _kernel.InjectFaultAsync(fault.ToRequest(), cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false)).FaultId;

    /// <summary>
    /// Removes the faults injected on <paramref name="address"/>, or on every device when it is null,
    /// and returns how many. ENODEV when the address names neither a device nor a fault.
    /// </summary>
    public async Task<int> ClearFaultsAsync(string? address = null, CancellationToken cancellationToken = default) =>
        (int)(await BrokerException.Wrap(() => _kernel.ClearFaultsAsync(new ClearFaultsRequest { Address = address ?? "" }, cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false)).Cleared;

    /// <summary>Every injected fault not yet cleared, in injection order, with its settings and how often it fired.</summary>
    public async Task<IReadOnlyList<InjectedFault>> ListFaultsAsync(CancellationToken cancellationToken = default) =>
        (await BrokerException.Wrap(() => _kernel.ListFaultsAsync(new ListFaultsRequest(), cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false)).Faults;

    /// <summary>Live counts of what the broker holds (sessions, containers, owned groups, memory, ...), for operators and leak checks.</summary>
    public Task<BrokerStats> GetStatsAsync(CancellationToken cancellationToken = default) =>
        BrokerException.Wrap(() => _kernel.GetStatsAsync(new GetStatsRequest(), cancellationToken: cancellationToken).ResponseAsync);

    /// <summary>
    /// The live sessions, oldest first, with their principal, client name, peer, age and what they
    /// hold. Viewers and admins see all; a caller whose highest role is user sees only its own.
    /// </summary>
    public async Task<IReadOnlyList<SessionInfo>> ListSessionsAsync(CancellationToken cancellationToken = default) =>
        (await BrokerException.Wrap(() => _kernel.ListSessionsAsync(new ListSessionsRequest(), cancellationToken: cancellationToken).ResponseAsync).ConfigureAwait(false)).Sessions;
}
