using DmaBroker.Client;
using DmaBroker.Protocol.V1;

namespace DmaBroker.Samples.Nvme;

/// <summary>
/// What SPDK's <c>setup.sh</c> and the VFIO open do before a userspace driver runs: the device is
/// taken from its kernel driver and bound to vfio-pci, a session claims its IOMMU group with a
/// container (VFIO_GROUP_SET_CONTAINER) and opens it (VFIO_GROUP_GET_DEVICE_FD), with a DMA channel
/// for its registers and doorbells and its MSI-X vectors. <see cref="CloseAsync"/> undoes it all
/// and gives the device back to the driver it had (<c>setup.sh reset</c>).
/// </summary>
public sealed class VfioBinding : IAsyncDisposable
{
    private const string VfioPci = "vfio-pci";

    private readonly BrokerClient _client;
    private readonly Action<string> _log;
    private readonly string _originalDriver;
    private IommuGroupClaim? _claim;
    private bool _closed;

    private VfioBinding(BrokerClient client, Device device, BrokerSession session, Container container, Action<string> log)
    {
        _client = client;
        _log = log;
        _originalDriver = device.Driver;
        Address = device.Address;
        GroupId = device.GroupId;
        Session = session;
        Container = container;
    }

    public string Address { get; }

    public uint GroupId { get; }

    public BrokerSession Session { get; }

    /// <summary>The type1v2 container whose IOVA space the device's DMA goes through.</summary>
    public Container Container { get; }

    /// <summary>The open device: config space, BAR0 and reset.</summary>
    public VfioDevice Device { get; private set; } = null!;

    /// <summary>Ordered register accesses and doorbells, pipelined.</summary>
    public DmaChannel Dma { get; private set; } = null!;

    /// <summary>The device's interrupts, from the session's events.</summary>
    public MsixVectors Vectors { get; private set; } = null!;

    /// <summary>
    /// Binds <paramref name="address"/> (a device of <paramref name="model"/>) to vfio-pci if it is
    /// not, opens a session named <paramref name="clientName"/>, claims the group and opens the device.
    /// </summary>
    public static async Task<VfioBinding> OpenAsync(BrokerClient client, string address, string model, string clientName, Action<string> log)
    {
        var device = (await client.ListDevicesAsync()).Devices.FirstOrDefault(d => d.Address == address)
            ?? throw new ArgumentException($"no device {address}; see 'dmactl devices'");
        if (device.Model != model)
            throw new ArgumentException($"{address} is a {device.Model} device, not {model}");
        log($"{address}: {device.VendorId:x4}:{device.DeviceId:x4} ({device.Model}), driver {Driver(device.Driver)}, IOMMU group {device.GroupId}");
        if (device.Driver != VfioPci)
        {
            if (device.Driver.Length > 0)
                await client.Admin.UnbindDriverAsync(address);
            await client.Admin.BindDriverAsync(address, VfioPci);
            log($"unbound {Driver(device.Driver)}, bound {VfioPci}");
        }
        BrokerSession? session = null;
        VfioBinding? binding = null;
        try
        {
            session = await client.OpenSessionAsync(clientName);
            var container = await session.NewContainerAsync(ContainerType.Type1V2);
            binding = new VfioBinding(client, device, session, container, log);
            binding._claim = await container.SetGroupAsync(device.GroupId);
            log($"session {session.Id}: container {container.Id} set on group {device.GroupId}");
            binding.Device = await session.OpenDeviceAsync(address);
            binding.Dma = await binding.Device.OpenDmaChannelAsync();
            binding.Vectors = MsixVectors.Listen(session, binding.Device, binding.Dma);
            log($"opened {address} (handle {binding.Device.Handle}) with a DMA channel for its registers");
            return binding;
        }
        catch
        {
            if (binding is not null)
                await binding.DisposeAsync();
            else
                await RestoreAsync(client, address, device.Driver, session);
            throw;
        }
    }

    /// <summary>
    /// Closes the DMA channel and the device (the broker resets it), releases the group, ends the
    /// session (which frees whatever memory is left) and binds the device's original driver again.
    /// </summary>
    public async Task CloseAsync()
    {
        if (_closed)
            return;
        _closed = true;
        try
        {
            if (Dma is not null)
                await Dma.DisposeAsync();
            if (Device is not null)
                await Device.DisposeAsync();
            if (_claim is not null && !Session.Ended.IsCompleted)
                await _claim.ReleaseAsync();
        }
        finally
        {
            await RestoreAsync(_client, Address, _originalDriver, Session);
        }
        _log($"closed {Address}, released group {GroupId}, ended session {Session.Id}");
        if (_originalDriver is not (VfioPci or ""))
            _log($"rebound {Address} to {_originalDriver}");
    }

    /// <summary>Ends the session and gives the device back to <paramref name="driver"/> (nothing to do for vfio-pci).</summary>
    private static async Task RestoreAsync(BrokerClient client, string address, string driver, BrokerSession? session)
    {
        if (session is not null)
            await session.DisposeAsync();
        if (driver == VfioPci)
            return;
        await client.Admin.UnbindDriverAsync(address);
        if (driver.Length > 0)
            await client.Admin.BindDriverAsync(address, driver);
    }

    /// <summary>As <see cref="CloseAsync"/>, on a path that is already failing: broker errors are left to the failure being reported.</summary>
    public async ValueTask DisposeAsync()
    {
        try
        {
            await CloseAsync();
        }
        catch (BrokerException)
        {
            // Ending the session released everything on the broker's side; only the rebind may be missing.
        }
    }

    private static string Driver(string driver) => driver.Length > 0 ? driver : "(none)";
}
