using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using Grpc.Core;
using Grpc.Health.V1;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>The read side, the admin side and the standard services.</summary>
public sealed class TopologyServiceTests
{
    [Fact]
    public async Task ListDevices_DefaultTopology_MatchesSpecTable()
    {
        await using var broker = await TestBroker.StartAsync();
        var devices = (await broker.Client.ListDevicesAsync()).Devices.ToDictionary(d => d.Address);
        Assert.Equal(23, devices.Count);
        var nvme = devices["0000:01:00.0"];
        Assert.Equal((0x144du, 0xa808u, 0x010802u, "nvme", "nvme", false), (nvme.VendorId, nvme.DeviceId, nvme.ClassCode, nvme.Model, nvme.Driver, nvme.DriverManagedDma));
        var edu = devices["0000:06:00.0"];
        Assert.Equal((0x1234u, 0x11e8u, "edu", "vfio-pci", true, 13u), (edu.VendorId, edu.DeviceId, edu.Model, edu.Driver, edu.DriverManagedDma, edu.GroupId));
        Assert.Equal("", devices["0000:03:00.1"].Driver);
    }

    [Fact]
    public async Task ListGroups_DefaultTopology_BootOwnership()
    {
        await using var broker = await TestBroker.StartAsync();
        var groups = (await broker.Client.ListGroupsAsync()).Groups.ToDictionary(g => g.Id);
        Assert.Equal((OwnerKind.Kernel, 1u), (groups[9].OwnerKind, groups[9].OwnerCount));
        Assert.Equal((OwnerKind.Kernel, 2u), (groups[10].OwnerKind, groups[10].OwnerCount));
        Assert.Equal(["0000:03:00.0", "0000:03:00.1"], groups[11].Devices);
        Assert.Equal(["0000:05:00.0", "0000:05:01.0", "0000:06:00.0", "0000:07:00.0"], groups[13].Devices);
        Assert.All(new uint[] { 11, 13, 14, 15, 16, 17 }, id => Assert.Equal(OwnerKind.None, groups[id].OwnerKind));
    }

    [Fact]
    public async Task Kernel_HotplugIntoSwitchGroupAndRemove_WatcherSeesBoth()
    {
        await using var broker = await TestBroker.StartAsync();
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();

        var added = await broker.Client.Admin.AddDeviceAsync(new HotplugDevice("0000:07:00.1", "edu")
        {
            VendorId = 0x1234, DeviceId = 0x11e8, ClassCode = 0x00ff00, Acs = true,
        });
        Assert.Equal(13u, added.GroupId);
        Assert.Equal("0000:07:00.1", (await watcher.NextAsync()).Device.Address);
        Assert.Contains("0000:07:00.1", (await watcher.NextAsync()).Group.Devices);

        await broker.Client.Admin.RemoveDeviceAsync("0000:07:00.1");
        Assert.Equal("0000:07:00.1", (await watcher.NextAsync()).DeviceRemoved.Address);
        Assert.DoesNotContain("0000:07:00.1", (await watcher.NextAsync()).Group.Devices);
    }

    [Fact]
    public async Task Kernel_BadRequests_ClearErrorsAndNoStateChange()
    {
        await using var broker = await TestBroker.StartAsync();
        var admin = broker.Client.Admin;
        var before = await broker.Client.ListDevicesAsync();

        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.BindDriverAsync("nope", "nvme"));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.BindDriverAsync("0000:03:00.1", "Bad Driver!"));
        await Expect(Errno.ENODEV, StatusCode.NotFound, () => admin.BindDriverAsync("0000:99:00.0", "nvme"));
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => admin.BindDriverAsync("0000:01:00.0", "vfio-pci"));
        await Expect(Errno.EINVAL, StatusCode.FailedPrecondition, () => admin.UnbindDriverAsync("0000:03:00.1"));
        await Expect(Errno.ENODEV, StatusCode.NotFound, () => admin.RemoveDeviceAsync("0000:99:00.0"));
        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => admin.RemoveDeviceAsync("0000:04:00.0"));
        await Expect(Errno.EEXIST, StatusCode.AlreadyExists, () => admin.AddDeviceAsync(new HotplugDevice("0000:08:00.0", "edu")));
        await Expect(Errno.ENODEV, StatusCode.NotFound, () => admin.AddDeviceAsync(new HotplugDevice("0000:42:00.0", "edu")));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.AddDeviceAsync(new HotplugDevice("0000:08:00.1", "bridge")));
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.AddDeviceAsync(new HotplugDevice("0000:08:00.1", "edu") { VendorId = 0x10000 }));

        var after = await broker.Client.ListDevicesAsync();
        Assert.Equal(before.Devices, after.Devices);
        Assert.Equal(before.Revision, after.Revision);
    }

    [Fact]
    public async Task Kernel_UnbindKernelDriverThenClaim_GroupBecomesFree()
    {
        await using var broker = await TestBroker.StartAsync();
        await broker.Client.Admin.UnbindDriverAsync("0000:01:00.0");
        await broker.Client.Admin.BindDriverAsync("0000:01:00.0", "vfio-pci");
        var group = await broker.Client.GetGroupAsync(9);
        Assert.Equal((OwnerKind.None, 0u), (group.OwnerKind, group.OwnerCount));
        await using var session = await broker.Client.OpenSessionAsync("nvme-user");
        await session.SetContainerAsync(9, await session.CreateContainerAsync(ContainerType.Type1V2));
        Assert.Equal(OwnerKind.User, (await broker.Client.GetGroupAsync(9)).OwnerKind);
    }

    [Fact]
    public async Task Health_Serving()
    {
        await using var broker = await TestBroker.StartAsync();
        var health = new Health.HealthClient(broker.Client.Raw.Channel);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await health.CheckAsync(new HealthCheckRequest())).Status);
    }

    [Theory]
    [InlineData("dmabroker.v1.Topology")]
    [InlineData("dmabroker.v1.Kernel")]
    [InlineData("dmabroker.v1.Session")]
    [InlineData("dmabroker.v1.Vfio")]
    [InlineData("dmabroker.v1.Memory")]
    [InlineData("dmabroker.v1.Dma")]
    public async Task Health_EachServiceByName_Serving(string service)
    {
        await using var broker = await TestBroker.StartAsync();
        var health = new Health.HealthClient(broker.Client.Raw.Channel);
        Assert.Equal(HealthCheckResponse.Types.ServingStatus.Serving, (await health.CheckAsync(new HealthCheckRequest { Service = service })).Status);
        var unknown = await Assert.ThrowsAsync<RpcException>(() => health.CheckAsync(new HealthCheckRequest { Service = "dmabroker.v1.Toaster" }).ResponseAsync);
        Assert.Equal(StatusCode.NotFound, unknown.StatusCode);
    }

    [Fact]
    public async Task Reflection_ListsTheBrokerServices()
    {
        await using var broker = await TestBroker.StartAsync();
        var reflection = new Grpc.Reflection.V1Alpha.ServerReflection.ServerReflectionClient(broker.Client.Raw.Channel);
        using var call = reflection.ServerReflectionInfo();
        await call.RequestStream.WriteAsync(new Grpc.Reflection.V1Alpha.ServerReflectionRequest { ListServices = "" });
        await call.RequestStream.CompleteAsync();
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var names = call.ResponseStream.Current.ListServicesResponse.Service.Select(s => s.Name).ToList();
        Assert.Contains("dmabroker.v1.Topology", names);
        Assert.Contains("dmabroker.v1.Vfio", names);
        Assert.Contains("dmabroker.v1.Session", names);
        Assert.Contains("dmabroker.v1.Kernel", names);
    }
}
