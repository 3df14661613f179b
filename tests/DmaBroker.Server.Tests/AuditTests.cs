using DmaBroker.Client;
using DmaBroker.Protocol.V1;
using DmaBroker.Server.Hosting;
using Grpc.Core;
using Microsoft.Extensions.Time.Testing;
using static DmaBroker.Server.Tests.Errors;

namespace DmaBroker.Server.Tests;

/// <summary>
/// SPEC §13's audit events: each ownership change and admin action, successful or refused, is
/// exactly one record in the DmaBroker.Audit category with principal, session, group, generation
/// and outcome, whichever way it came about.
/// </summary>
public sealed class AuditTests
{
    private const uint EduGroup = 14;       // 0000:08:00.0, vfio-pci, free
    private const uint SwitchGroup = 13;    // 0000:05:00.0, 05:01.0, 06:00.0 (vfio-pci), 07:00.0 (no driver)
    private const uint NvmeGroup = 9;       // 0000:01:00.0, nvme: KERNEL(1)
    private const string Anonymous = "anonymous";

    [Fact]
    public async Task SetContainer_Claim_OneClaimRecordWithTheNewGeneration()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(EduGroup, await a.CreateContainerAsync(ContainerType.Type1V2));

        Assert.Equal([new Audit("Claim", "ok", Anonymous, a.Id, EduGroup, 1)], Records(broker));
    }

    [Fact]
    public async Task UnsetContainer_Release_OneReleaseRecordOfTheSameGeneration()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(EduGroup, await a.CreateContainerAsync(ContainerType.Type1V2));
        await a.UnsetContainerAsync(EduGroup);

        Assert.Equal(
            [new Audit("Claim", "ok", Anonymous, a.Id, EduGroup, 1), new Audit("Release", "ok", Anonymous, a.Id, EduGroup, 1)],
            Records(broker));
        Assert.Equal("owner count 0", broker.Log.Records.Last().Fields["Detail"]);
    }

    [Fact]
    public async Task SetContainer_KernelOwnedGroup_RefusedClaimAuditedWithItsErrno()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        var container = await a.CreateContainerAsync(ContainerType.Type1V2);

        await Expect(Errno.EPERM, StatusCode.PermissionDenied, () => a.SetContainerAsync(NvmeGroup, container));

        Assert.Equal([new Audit("Claim", "EPERM", Anonymous, a.Id, NvmeGroup, 0)], Records(broker));
    }

    [Fact]
    public async Task BindDevice_TwoDevicesOfOneGroup_EachClaimAuditedWithItsCount()
    {
        await using var broker = await StartAsync();
        await broker.Client.Admin.BindDriverAsync("0000:07:00.0", "vfio-pci");
        await using var a = await broker.Client.OpenSessionAsync("a");
        var container = await a.CreateContainerAsync(ContainerType.Iommufd);

        await a.BindDeviceAsync("0000:06:00.0", container);
        await a.BindDeviceAsync("0000:07:00.0", container);

        Assert.Equal(
        [
            new Audit("DriverBind", "ok", Anonymous, 0, SwitchGroup, 0),
            new Audit("Claim", "ok", Anonymous, a.Id, SwitchGroup, 1),
            new Audit("Claim", "ok", Anonymous, a.Id, SwitchGroup, 1),
        ], Records(broker));
        Assert.Equal("owner count 2", broker.Log.Records.Last().Fields["Detail"]);
    }

    [Fact]
    public async Task BindDriver_DmaApiDriverIntoUserOwnedGroup_RefusalNamesTheOwnerAndGeneration()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(SwitchGroup, await a.CreateContainerAsync(ContainerType.Type1V2));

        await Expect(Errno.EBUSY, StatusCode.FailedPrecondition, () => broker.Client.Admin.BindDriverAsync("0000:07:00.0", "nvme"));

        Assert.Equal(
            [new Audit("Claim", "ok", Anonymous, a.Id, SwitchGroup, 1), new Audit("DriverBind", "EBUSY", Anonymous, a.Id, SwitchGroup, 1)],
            Records(broker));
    }

    [Fact]
    public async Task RevokeSession_HoldingAGroup_ReleaseSaysWhyThenTheRevocation()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(EduGroup, await a.CreateContainerAsync(ContainerType.Type1V2));

        await broker.Client.Admin.RevokeSessionAsync(a.Id, "maintenance");

        // The release is made by the revocation's teardown, before the revocation returns and is audited.
        Assert.Equal(
        [
            new Audit("Claim", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("Release", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("SessionRevoke", "ok", Anonymous, a.Id, 0, 0),
        ], Records(broker));
        Assert.Equal("owner count 0; the session ended: maintenance", AuditRecords(broker)[1].Fields["Detail"]);
    }

    [Fact]
    public async Task RevokeSession_UnknownSession_RefusalAudited()
    {
        await using var broker = await StartAsync();

        await Expect(Errno.ENOENT, StatusCode.NotFound, () => broker.Client.Admin.RevokeSessionAsync(999));

        Assert.Equal([new Audit("SessionRevoke", "ENOENT", Anonymous, 999, 0, 0)], Records(broker));
    }

    [Fact]
    public async Task Lease_ClientSilentForTtl_ReleaseAuditedAsLeaseExpired()
    {
        var time = new FakeTimeProvider();
        await using var broker = await StartAsync(time, "--lease-ttl-ms", "3000");
        await using var watcher = new Watcher(broker.Client);
        await watcher.NextAsync();
        // A raw stream that never pings, standing for a hung client.
        using var call = broker.Client.Raw.Session.Open();
        Assert.True(await call.ResponseStream.MoveNext().WaitAsync(TestBroker.Timeout));
        var opened = call.ResponseStream.Current.Opened;
        var vfio = broker.VfioWithToken(opened.Token);
        var container = (await vfio.CreateContainerAsync(new CreateContainerRequest { Type = ContainerType.Type1V2 })).ContainerId;
        await vfio.SetContainerAsync(new SetContainerRequest { GroupId = EduGroup, ContainerId = container });

        time.Advance(TimeSpan.FromMilliseconds(3000));
        // Audited before any watcher sees the change.
        await watcher.WaitForGroupAsync(g => g.Id == EduGroup && g.OwnerKind == OwnerKind.None);

        Assert.Equal(
            [new Audit("Claim", "ok", Anonymous, opened.SessionId, EduGroup, 1), new Audit("Release", "ok", Anonymous, opened.SessionId, EduGroup, 1)],
            Records(broker));
        Assert.Equal("owner count 0; the session ended: lease expired", AuditRecords(broker)[1].Fields["Detail"]);
    }

    [Fact]
    public async Task Claim_ByTokenPrincipalOutsideItsGroups_RefusalNamesThePrincipal()
    {
        await using var secure = await StartSecureAsync();
        await using var session = await secure.Connect("user-secret").OpenSessionAsync("a");
        var container = await session.CreateContainerAsync(ContainerType.Type1V2);

        await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => session.SetContainerAsync(EduGroup, container));

        Assert.Equal([new Audit("Claim", "EACCES", "token:user", session.Id, EduGroup, 0)], Records(secure.Log));
    }

    [Fact]
    public async Task BindDriver_ByViewer_RefusedAtTheGateAndAudited()
    {
        await using var secure = await StartSecureAsync();

        await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => secure.Connect("viewer-secret").Admin.BindDriverAsync("0000:07:00.0", "vfio-pci"));

        Assert.Equal([new Audit("DriverBind", "EACCES", "token:viewer", 0, 0, 0)], Records(secure.Log));
    }

    [Fact]
    public async Task InjectFault_OkAndRefused_EachOneFaultInjectRecordWithTheGroupAndItsOwner()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(EduGroup, await a.CreateContainerAsync(ContainerType.Type1V2));
        var admin = broker.Client.Admin;

        await admin.InjectFaultAsync(new FaultInjection("0000:08:00.0", FaultKind.IommuFault) { Count = 2 });
        await Expect(Errno.EINVAL, StatusCode.InvalidArgument, () => admin.InjectFaultAsync(new FaultInjection("0000:08:00.0", FaultKind.IommuFault) { ProbabilityPercent = 101 }));
        await admin.ClearFaultsAsync("0000:08:00.0");

        Assert.Equal(
        [
            new Audit("Claim", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("FaultInject", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("FaultInject", "EINVAL", Anonymous, a.Id, EduGroup, 1),
            new Audit("FaultInject", "ok", Anonymous, a.Id, EduGroup, 1),
        ], Records(broker));
        Assert.Equal(
            ["InjectFault '0000:08:00.0' iommu-fault (count 2)", "InjectFault '0000:08:00.0' iommu-fault (probability 101% (seed 0))", "ClearFaults '0000:08:00.0'"],
            AuditRecords(broker).Skip(1).Select(r => (string)r.Fields["Detail"]!));
    }

    [Fact]
    public async Task InjectFault_SurpriseRemoveOfAnOwnedDevice_AuditedOnceWithTheReleaseFromTheJournal()
    {
        await using var broker = await StartAsync();
        await using var a = await broker.Client.OpenSessionAsync("a");
        await a.SetContainerAsync(EduGroup, await a.CreateContainerAsync(ContainerType.Type1V2));

        await broker.Client.Admin.InjectFaultAsync(new FaultInjection("0000:08:00.0", FaultKind.SurpriseRemove));

        Assert.Equal(
        [
            new Audit("Claim", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("Release", "ok", Anonymous, a.Id, EduGroup, 1),
            new Audit("FaultInject", "ok", Anonymous, a.Id, EduGroup, 1),
        ], Records(broker));
    }

    [Fact]
    public async Task InjectFault_ByViewer_RefusedAtTheGateAndAudited()
    {
        await using var secure = await StartSecureAsync();

        await Expect(Errno.EACCES, StatusCode.PermissionDenied, () => secure.Connect("viewer-secret").Admin.InjectFaultAsync(new FaultInjection("0000:08:00.0", FaultKind.IommuFault)));

        Assert.Equal([new Audit("FaultInject", "EACCES", "token:viewer", 0, 0, 0)], Records(secure.Log));
    }

    // A user allowed group 15 only, and a viewer.
    private static Task<SecureBroker> StartSecureAsync() => SecureBroker.StartAsync($$"""
        { "principals": [
            { "name": "token:user", "token_sha256": "{{SecureBroker.Sha256("user-secret")}}", "roles": ["user"], "groups": [15] },
            { "name": "token:viewer", "token_sha256": "{{SecureBroker.Sha256("viewer-secret")}}", "roles": ["viewer"] } ] }
        """, "--Logging:LogLevel:DmaBroker.Audit=Information");

    private sealed record Audit(string Event, string Outcome, string Principal, ulong Session, uint Group, ulong Generation);

    private static Task<TestBroker> StartAsync(TimeProvider? time = null, params string[] args) =>
        TestBroker.StartAsync(time, ["--Logging:LogLevel:DmaBroker.Audit=Information", .. args]);

    private static List<BrokerLogRecord> AuditRecords(TestBroker broker) => AuditRecords(broker.Log);

    private static List<BrokerLogRecord> AuditRecords(BrokerLog log) => [.. log.Records.Where(r => r.Category == BrokerAudit.Category)];

    private static List<Audit> Records(TestBroker broker) => Records(broker.Log);

    private static List<Audit> Records(BrokerLog log) =>
        [.. AuditRecords(log).Select(r => new Audit(r.EventId.Name!, (string)r.Fields["Outcome"]!, (string)r.Fields["Principal"]!,
            (ulong)r.Fields["SessionId"]!, (uint)r.Fields["GroupId"]!, (ulong)r.Fields["Generation"]!))];
}
