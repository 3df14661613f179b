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
/// The kernel and operator side of a broker (SPEC §7): driver binding, hotplug, session revocation
/// and live counts. Reached as <see cref="BrokerClient.Admin"/>. Rejections throw
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
